//! The CRC-32 that closes every envelope and checks every reassembled chunked payload. Its own
//! module so that envelopes and signatures (which sit before the CRC) both use it without
//! depending on each other.

/// Size of the trailing checksum.
pub const CRC_LEN: usize = 4;

#[cfg(feature = "std")]
type CrcImpl = crc::Table<16>;
// On microcontrollers the 16 KiB slice-by-16 table costs more flash than the speed is worth.
#[cfg(not(feature = "std"))]
type CrcImpl = crc::Table<1>;

static CRC32: crc::Crc<u32, CrcImpl> = crc::Crc::<u32, CrcImpl>::new(&crc::CRC_32_ISO_HDLC);

/// CRC-32/ISO-HDLC of `bytes` (the checksum used by envelopes and chunks).
pub fn crc32(bytes: &[u8]) -> u32 {
    CRC32.checksum(bytes)
}

static CRC32C: crc::Crc<u32, CrcImpl> = crc::Crc::<u32, CrcImpl>::new(&crc::CRC_32_ISCSI);

/// CRC-32C (Castagnoli) of `bytes`: the digest a chunk carries of its whole payload. Not the
/// envelope's CRC-32: the CRC-32 of bytes that end in their own CRC-32 (every envelope) is one
/// constant, so it would tell no two payloads apart.
pub fn crc32c(bytes: &[u8]) -> u32 {
    CRC32C.checksum(bytes)
}
