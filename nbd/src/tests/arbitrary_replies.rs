use super::*;
use proptest::prelude::*;

/// A reply chunk for request 1, often well-formed in its framing, with contents that
/// are anything.
fn chunk() -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![
        (0u64..8192, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(offset, bytes)| (
            REPLY_TYPE_OFFSET_DATA,
            [&offset.to_be_bytes()[..], &bytes].concat()
        )),
        (0u64..8192, 0u32..8192).prop_map(|(offset, length)| (
            REPLY_TYPE_OFFSET_HOLE,
            [&offset.to_be_bytes()[..], &length.to_be_bytes()].concat()
        )),
        (
            0u32..3,
            proptest::collection::vec((0u32..5000, 0u32..4), 0..4)
        )
            .prop_map(|(id, extents)| {
                let mut p = id.to_be_bytes().to_vec();
                for (length, flags) in extents {
                    p.extend_from_slice(&length.to_be_bytes());
                    p.extend_from_slice(&flags.to_be_bytes());
                }
                (REPLY_TYPE_BLOCK_STATUS, p)
            }),
        (
            prop_oneof![
                Just(REPLY_TYPE_ERROR_BIT | 1),
                Just(REPLY_TYPE_ERROR_OFFSET),
                Just(REPLY_TYPE_NONE),
                any::<u16>()
            ],
            proptest::collection::vec(any::<u8>(), 0..32)
        ),
    ];
    (
        0u16..2,
        payload,
        prop::option::weighted(0.1, any::<u32>()),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(flags, (kind, payload), lie, simple)| {
            if simple {
                return fake::simple(u32::from(flags), 1);
            }
            let length = lie.unwrap_or(u32::try_from(payload.len()).unwrap());
            fake::chunk_with_length(flags, kind, 1, length, &payload)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn never_panic(chunks in proptest::collection::vec(chunk(), 0..6), raw in proptest::collection::vec(any::<u8>(), 0..64)) {
        let contexts = [(1, BASE_ALLOCATION), (2, "x-a:b")];
        let names = [BASE_ALLOCATION, "x-a:b"];
        for tail in [chunks.concat(), raw] {
            let mut script = fake::handshake(8192, &contexts);
            script.extend(&tail);
            let mut client = fake::connect(script.clone(), &names).unwrap();
            let mut buf = vec![0; 4096];
            drop(client.read_at(4096, &mut buf));
            let mut client = fake::connect(script, &names).unwrap();
            if let Ok(extents) = client.block_status(BASE_ALLOCATION, 0, 4096) {
                prop_assert_eq!(extents.first().map(|e| e.offset), Some(0));
                prop_assert_eq!(extents.last().map(Extent::end), Some(4096));
            }
        }
    }

    #[test]
    fn broken_handshakes_never_panic(cut in 0usize..200, flip in any::<(usize, u8)>()) {
        let mut script = fake::handshake(8192, &[(1, BASE_ALLOCATION)]);
        let at = flip.0 % script.len();
        script[at] ^= flip.1;
        script.truncate(cut.max(at + 1));
        drop(fake::connect(script, &[BASE_ALLOCATION]));
    }
}
