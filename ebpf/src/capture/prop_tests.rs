//! Property tests of the values the loader writes to and reads back from the capture's
//! maps: the `struct delivery_key` layout the C program compares against.

use proptest::prelude::*;

use super::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Address and port in network order, padding zero, and distinct sources never share a
    /// key (an exemption for one delivery never lets another through).
    #[test]
    fn delivery_keys_are_exact_and_distinct(a in any::<[u8; 4]>(), p in any::<u16>(), b in any::<[u8; 4]>(), q in any::<u16>()) {
        let (x, y) = (SocketAddrV4::new(Ipv4Addr::from(a), p), SocketAddrV4::new(Ipv4Addr::from(b), q));
        let bytes = delivery_key(x).to_ne_bytes();
        prop_assert_eq!(&bytes[..4], &a[..]);
        prop_assert_eq!(&bytes[4..6], &p.to_be_bytes()[..]);
        prop_assert_eq!(&bytes[6..], &[0u8, 0][..]);
        prop_assert_eq!(delivery_key(x) == delivery_key(y), x == y);
    }

    /// A key read back from the map (any 8 bytes another agent left there) decodes to the
    /// source it names, and re-encodes to itself exactly when its padding is zero.
    #[test]
    fn any_key_read_back_is_understood(key in any::<u64>()) {
        let b = key.to_ne_bytes();
        let source = SocketAddrV4::new(Ipv4Addr::new(b[0], b[1], b[2], b[3]), u16::from_be_bytes([b[4], b[5]]));
        prop_assert_eq!(delivery_key(source) == key, b[6] == 0 && b[7] == 0);
    }
}
