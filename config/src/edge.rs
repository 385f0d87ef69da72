//! The edge-client config file as written (moved here from the edge client).
