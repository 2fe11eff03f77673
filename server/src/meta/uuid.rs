//! Identities: random (version 4) UUIDs for pools, volumes and snapshots.

/// A UUID in its usual text form.
pub fn uuid_text(u: u128) -> String {
    let h = format!("{u:032x}");
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A random (version 4) UUID.
pub fn new_uuid() -> u128 {
    let r: u128 = rand::random();
    (r & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62)
}

/// A fresh random UUID in text form.
pub fn new_uuid_text() -> String {
    uuid_text(new_uuid())
}
