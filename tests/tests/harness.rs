//! Checks of the end-to-end harness itself: if these fail, the federation tests cannot mean
//! anything.

use fedpeft_tests::{Mosquitto, wait_for_port};
use std::time::Duration;

#[test]
fn mosquitto_listens_on_its_own_free_loopback_port_and_stops_when_dropped() {
    let port = {
        let broker = Mosquitto::start(1 << 20);
        assert!(wait_for_port(broker.port, Duration::from_secs(2)));
        broker.port
    };
    // Dropped: nothing should accept connections there any more.
    assert!(!wait_for_port(port, Duration::from_millis(500)));
}
