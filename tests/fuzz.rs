//! Every decoder of bytes that come from outside, fed arbitrary and hostile input:
//! it answers `Ok` or `Err`, never panics, and never allocates what a length prefix
//! claims before the bytes are there. Valid encodings round-trip; truncated,
//! extended and bit-flipped ones are refused. `PROPTEST_CASES` sets the number of
//! cases of every property.
//!
//! Decoders with unit proptests next to them (signal frames, peer frames, sync
//! messages) are covered here only where those stop: exact size limits, every
//! truncation, trailing bytes, huge length prefixes, hostile names.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use proptest::sample::Index;

/// Counts, per thread, the largest single allocation asked for, so a test can
/// prove a decoder did not reserve what a hostile length prefix announced.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations during thread teardown are not tracked.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and returns its result with the largest single allocation it asked for.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(Cell::get))
}

/// `default` cases, unless `PROPTEST_CASES` says otherwise.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Bytes with a bias towards the ones decoders treat specially.
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => any::<u8>(),
        1 => prop::sample::select(vec![0u8, b'/', b'.', b'\n', b'#', b'"', b'{', b'[', 0xff, 0x80]),
    ];
    prop::collection::vec(byte, 0..max)
}

/// The postcard/LEB128 encoding of `n`.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Length prefixes far beyond anything a message may hold.
fn huge_len() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::from(u32::MAX)),
        Just(4 << 30),
        Just(u64::MAX),
        (1u64 << 24)..u64::MAX,
    ]
}

mod names {
    //! `UserName`/`GroupName` and `.members`.

    use std::path::{Component, Path};

    use brume::fs::tree::parse_members;
    use brume::ids::{GroupName, UserName};

    use super::*;

    /// What a user or group name may be, as the README states it.
    fn acceptable(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    }

    pub(crate) fn valid_user() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,63}"
    }

    pub(crate) fn hostile_user() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "",
                ".",
                "..",
                ".members",
                ".wsserver.json",
                ".brume",
                "-rf",
                "a/b",
                "../x",
                "/abs",
                "a\0b",
                "a b",
                "é",
                "a\n",
            ])
            .prop_map(str::to_owned),
            "[a-z]{65,80}",
            "[.-][a-z]{0,8}",
            "[a-z]{0,4}[/\\\\ \0\n:*é][a-z]{0,4}",
        ]
    }

    fn any_name() -> impl Strategy<Value = String> {
        prop_oneof![
            valid_user(),
            hostile_user(),
            any::<String>(),
            "[a-z.-]{0,4}"
        ]
    }

    proptest! {
        #![proptest_config(cases(1000))]

        #[test]
        fn names_are_accepted_exactly_when_path_safe(s in any_name()) {
            let user = UserName::new(&s);
            let group = GroupName::new(&s);
            prop_assert_eq!(user.is_ok(), acceptable(&s), "{:?}", s);
            prop_assert_eq!(group.is_ok(), user.is_ok());
            // Deserializing goes through the same check.
            let json = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(serde_json::from_str::<UserName>(&json).is_ok(), user.is_ok());
            if let Ok(u) = user {
                prop_assert_eq!(u.as_str(), s.as_str());
                let parts: Vec<_> = Path::new(&s).components().collect();
                prop_assert_eq!(parts, vec![Component::Normal(s.as_ref())]);
            }
        }

        #[test]
        fn members_lists_hold_only_valid_unique_names(text in bytes(600)) {
            let members = parse_members(&text);
            let lossy = String::from_utf8_lossy(&text);
            for (i, m) in members.iter().enumerate() {
                prop_assert!(UserName::new(m).is_ok(), "{:?}", m);
                prop_assert!(!members[..i].contains(m), "duplicate {:?}", m);
                prop_assert!(lossy.contains(m.as_str()));
            }
        }

        #[test]
        fn members_lists_read_back_with_comments_and_hostile_lines(
            lines in prop::collection::vec(
                (prop_oneof![3 => valid_user().prop_map(Some), 1 => hostile_user().prop_map(|_| None)],
                 "[ \t]{0,2}", prop::option::of("[^\n]{0,10}")),
                0..20,
            ),
            hostile in prop::collection::vec(hostile_user(), 0..5),
        ) {
            let mut text = String::new();
            let mut want: Vec<String> = Vec::new();
            for (name, pad, comment) in &lines {
                if let Some(n) = name {
                    text.push_str(&format!("{pad}{n}{pad}"));
                    if !want.contains(n) {
                        want.push(n.clone());
                    }
                }
                if let Some(c) = comment {
                    text.push_str(&format!("#{c}"));
                }
                text.push('\n');
            }
            for h in &hostile {
                // A hostile line (without its own line breaks) is skipped.
                let h = h.replace(['\n', '#'], "");
                if UserName::new(h.trim()).is_err() {
                    text.push_str(&h);
                    text.push('\n');
                }
            }
            prop_assert_eq!(parse_members(text.as_bytes()), want);
        }
    }
}

mod config {
    //! `brume.conf` and the files of the data directory.

    use std::os::unix::fs::PermissionsExt;

    use brume::config::{CacheConfig, Config, FsConfig};
    use brume::fs::{MountState, mount_state};
    use brume::ids::UserName;
    use brume::signal::identity::{IDENTITY_FILE, IdentityError, load_or_create};

    use super::*;

    fn config() -> impl Strategy<Value = Config> {
        (
            any::<String>(),
            names::valid_user(),
            any::<String>(),
            prop::collection::vec(any::<String>(), 0..3),
            // TOML integers are signed 64-bit.
            0..=i64::MAX as u64,
            any::<bool>(),
            any::<bool>(),
            0..=i64::MAX as usize,
            any::<bool>(),
            0..=i64::MAX as u64,
        )
            .prop_map(
                |(
                    server_url,
                    user,
                    credential,
                    ice_servers,
                    max_bytes,
                    full_copy,
                    passthrough,
                    threads,
                    pin_threads,
                    busy_cpu_us,
                )| {
                    Config {
                        server_url,
                        server_ca: None,
                        ice_policy: Default::default(),
                        username: UserName::new(&user).unwrap(),
                        credential,
                        ice_servers,
                        udp_addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 0))],
                        cache: CacheConfig {
                            max_bytes,
                            full_copy,
                        },
                        fs: FsConfig {
                            passthrough,
                            threads,
                            pin_threads,
                            busy_cpu_us,
                        },
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(cases(500))]

        #[test]
        fn configs_round_trip(c in config()) {
            prop_assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
        }

        #[test]
        fn arbitrary_text_is_not_a_config(text in any::<String>()) {
            // Three required keys: random text never has them.
            prop_assert!(Config::parse(&text).is_err());
        }

        #[test]
        fn damaged_configs_never_panic(
            c in config(),
            flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..6),
            cut in any::<Index>(),
            junk in bytes(40),
        ) {
            let mut text = c.to_toml().into_bytes();
            for (at, b) in flips {
                let i = at.index(text.len());
                text[i] = b;
            }
            text.truncate(cut.index(text.len() + 1));
            text.extend(junk);
            if let Ok(parsed) = Config::parse(&String::from_utf8_lossy(&text)) {
                // Whatever parsed is a config that writes and reads back as itself.
                prop_assert_eq!(Config::parse(&parsed.to_toml()).unwrap(), parsed);
            }
        }

        #[test]
        fn hostile_user_names_are_refused_in_configs(user in names::hostile_user()) {
            let text = format!(
                "server_url = \"ws://x/\"\nusername = {}\ncredential = \"c\"\n",
                serde_json::to_string(&user).unwrap()
            );
            prop_assert!(Config::parse(&text).is_err(), "{:?} accepted", user);
        }
    }

    #[test]
    fn deeply_nested_config_values_are_refused() {
        for depth in [10, 1_000, 30_000] {
            let arrays = format!(
                "server_url = {}\"x\"{}\n",
                "[".repeat(depth),
                "]".repeat(depth)
            );
            assert!(Config::parse(&arrays).is_err(), "depth {depth}");
            let tables = format!("fs = {}{}\n", "{a = ".repeat(depth), "}".repeat(depth));
            assert!(Config::parse(&tables).is_err(), "depth {depth}");
        }
    }

    proptest! {
        #![proptest_config(cases(256))]

        #[test]
        fn identity_keys_load_only_from_32_private_bytes(
            content in prop_oneof![bytes(80), prop::collection::vec(any::<u8>(), 31..=33)],
            mode in prop_oneof![Just(0o600u32), Just(0o400), 0u32..0o1000],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(IDENTITY_FILE);
            std::fs::write(&path, &content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            // Only the owner's read bit matters to the test (it runs as its owner or root).
            let readable = mode & 0o400 != 0 || nix_is_root();
            match load_or_create(dir.path()) {
                Ok(key) => {
                    prop_assert!(mode & 0o077 == 0 && content.len() == 32);
                    prop_assert_eq!(&key.to_bytes()[..], &content[..]);
                }
                Err(IdentityError::Exposed { mode: m, .. }) => {
                    prop_assert!(mode & 0o077 != 0);
                    prop_assert_eq!(m, mode);
                }
                Err(IdentityError::Corrupt { len, .. }) => {
                    prop_assert!(content.len() != 32);
                    prop_assert_eq!(len, content.len().min(33));
                }
                Err(IdentityError::Io { .. }) => prop_assert!(!readable),
                Err(e) => prop_assert!(false, "unexpected {}", e),
            }
        }

        #[test]
        fn mount_state_files_never_panic(text in prop_oneof![
            bytes(200),
            (any::<u32>(), any::<String>(), any::<bool>()).prop_map(|(pid, m, p)| {
                serde_json::to_vec(&serde_json::json!({"pid": pid, "mountpoint": m, "passthrough_wanted": p})).unwrap()
            }),
        ]) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("mount.json"), &text).unwrap();
            let state: Option<MountState> = mount_state(dir.path());
            let direct = serde_json::from_slice::<serde_json::Value>(&text).is_ok();
            if state.is_some() {
                prop_assert!(direct);
            }
        }
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn a_huge_identity_file_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        let file = std::fs::File::create(&path).unwrap();
        // Sparse: no disk space, but reading it whole would take a gigabyte of memory.
        file.set_len(1 << 30).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (result, largest) = largest_allocation(|| load_or_create(dir.path()));
        assert!(
            matches!(result, Err(IdentityError::Corrupt { len: 33, .. })),
            "{result:?}"
        );
        assert!(largest < 64 * 1024, "allocated {largest} bytes");
    }
}

mod signal {
    //! Signaling frames, identity keys, HTTP bodies and access tokens.

    use brume::ids::UserName;
    use brume::signal::protocol::{
        ClientToServer, HttpError, IdentityKey, MAX_MESSAGE_BYTES, ProtocolError, ServerToClient,
    };
    use brume::signal::token::{
        TOKEN_LEEWAY_SECS, TokenError, TokenKey, TokenRequest, TokenResponse,
    };
    use serde_json::{Value, json};

    use super::*;

    fn key_text() -> impl Strategy<Value = String> {
        any::<[u8; 32]>().prop_map(|seed| {
            IdentityKey::from(ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key())
                .to_string()
        })
    }

    /// JSON that looks like a message: a known or unknown tag and fields of the
    /// right names with values of any type.
    fn message_like() -> impl Strategy<Value = Value> {
        let tag = prop::sample::select(vec![
            "hello",
            "relay",
            "watch",
            "unwatch",
            "get_key",
            "refresh",
            "welcome",
            "presence",
            "key",
            "error",
            "refreshed",
            "nope",
            "",
        ]);
        let field = prop::sample::select(vec![
            "version",
            "identity_key",
            "to",
            "from",
            "payload",
            "users",
            "id",
            "user",
            "token",
            "expires_in",
            "online",
            "code",
            "message",
            "type",
            "extra",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            names::valid_user().prop_map(Value::String),
            names::hostile_user().prop_map(Value::String),
            key_text().prop_map(Value::String),
            prop::sample::select(vec!["ENODEST", "400", "EBADDEST", "E"]).prop_map(|s| json!(s)),
            any::<String>().prop_map(Value::String),
        ];
        let value = prop_oneof![
            3 => leaf.clone(),
            1 => prop::collection::vec(leaf, 0..4).prop_map(Value::Array),
        ];
        (tag, prop::collection::vec((field, value), 0..6)).prop_map(|(tag, fields)| {
            let mut obj = serde_json::Map::new();
            obj.insert("type".into(), json!(tag));
            for (k, v) in fields {
                obj.insert(k.into(), v);
            }
            Value::Object(obj)
        })
    }

    proptest! {
        #![proptest_config(cases(1000))]

        #[test]
        fn decoded_messages_encode_to_what_decodes_to_them(v in message_like()) {
            let text = v.to_string();
            if let Ok(m) = ClientToServer::decode(&text) {
                prop_assert_eq!(ClientToServer::decode(&m.encode().unwrap()).unwrap(), m);
            }
            if let Ok(m) = ServerToClient::decode(&text) {
                prop_assert_eq!(ServerToClient::decode(&m.encode().unwrap()).unwrap(), m);
            }
        }

        #[test]
        fn hostile_user_names_are_refused_in_every_field(user in names::hostile_user(), key in key_text()) {
            for frame in [
                json!({"type": "relay", "to": user, "payload": 1}),
                json!({"type": "watch", "users": ["bob", user]}),
                json!({"type": "unwatch", "users": [user]}),
                json!({"type": "get_key", "id": 1, "user": user}),
            ] {
                let r = ClientToServer::decode(&frame.to_string());
                prop_assert!(matches!(r, Err(ProtocolError::Malformed { .. })), "{}", frame);
            }
            for frame in [
                json!({"type": "welcome", "version": 1, "user": user, "expires_in": 5}),
                json!({"type": "relay", "from": user, "payload": 1}),
                json!({"type": "presence", "user": user, "online": true}),
                json!({"type": "key", "id": 1, "user": user, "identity_key": key}),
                json!({"type": "error", "code": "ENODEST", "message": "m", "user": user}),
            ] {
                let r = ServerToClient::decode(&frame.to_string());
                prop_assert!(matches!(r, Err(ProtocolError::Malformed { .. })), "{}", frame);
            }
        }

        #[test]
        fn the_size_limit_is_exact(user in names::valid_user(), extra in 0usize..64) {
            let msg = ClientToServer::GetKey { id: 7, user: UserName::new(&user).unwrap() };
            let text = msg.encode().unwrap();
            // JSON allows trailing whitespace: pad to the limit, then beyond it.
            let at_limit = format!("{text}{}", " ".repeat(MAX_MESSAGE_BYTES - text.len()));
            prop_assert_eq!(ClientToServer::decode(&at_limit).unwrap(), msg);
            let over = format!("{at_limit}{}", " ".repeat(extra + 1));
            let r = ClientToServer::decode(&over);
            prop_assert!(
                matches!(r, Err(ProtocolError::TooBig { len, .. }) if len == over.len()),
                "{:?}", r
            );
        }

        #[test]
        fn identity_keys_parse_only_from_their_canonical_text(text in prop_oneof![
            any::<String>(),
            "[A-Za-z0-9_-]{42,44}",
            key_text(),
            key_text().prop_map(|k| format!("{k}=")),
        ]) {
            if let Ok(key) = IdentityKey::try_from(text.clone()) {
                // Only canonical base64url of a valid key gets here.
                prop_assert_eq!(key.to_string(), text);
                prop_assert!(key.verifying_key().is_ok());
            }
        }

        #[test]
        fn identity_keys_round_trip(seed: [u8; 32]) {
            let key = IdentityKey::from(ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key());
            prop_assert_eq!(IdentityKey::try_from(key.to_string()).unwrap(), key);
        }

        #[test]
        fn http_bodies_never_panic(body in prop_oneof![
            bytes(300),
            message_like().prop_map(|v| v.to_string().into_bytes()),
        ]) {
            if let Ok(r) = serde_json::from_slice::<TokenRequest>(&body) {
                prop_assert!(UserName::new(r.username.as_str()).is_ok());
            }
            let _ = serde_json::from_slice::<TokenResponse>(&body);
            let _ = serde_json::from_slice::<HttpError>(&body);
        }

        #[test]
        fn token_requests_round_trip(user in names::valid_user(), credential: String, ttl: Option<u64>) {
            let req = TokenRequest { username: UserName::new(&user).unwrap(), credential, ttl };
            let back: TokenRequest = serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
            prop_assert_eq!((back.username, back.credential, back.ttl), (req.username, req.credential, req.ttl));
        }
    }

    #[test]
    fn deeply_nested_payloads_are_refused_without_overflowing_the_stack() {
        for depth in [1, 100, 127, 129, 1_000, 16_000] {
            let frame = format!(
                "{{\"type\":\"relay\",\"to\":\"bob\",\"payload\":{}{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            );
            let r = ClientToServer::decode(&frame);
            // serde_json stops at 128 levels, the frame's own object included.
            assert_eq!(r.is_ok(), depth < 127, "depth {depth}: {r:?}");
            let s = ServerToClient::decode(&frame.replace("\"to\"", "\"from\""));
            assert_eq!(s.is_ok(), depth < 127, "depth {depth}");
        }
    }

    fn time() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0),
            Just(u64::MAX),
            Just(u64::MAX - TOKEN_LEEWAY_SECS),
            0u64..5_000,
            any::<u64>(),
        ]
    }

    proptest! {
        #![proptest_config(cases(500))]

        #[test]
        fn arbitrary_tokens_are_refused(
            token in prop_oneof![
                any::<String>(),
                "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,50}",
            ],
            now in time(),
        ) {
            let key = TokenKey::from_secret(&[1; 32]);
            let r = key.verify(&token, now);
            prop_assert!(r.is_err());
            prop_assert_eq!(matches!(r, Err(TokenError::Missing)), token.is_empty());
        }

        #[test]
        fn tokens_verify_exactly_within_their_times(
            user in names::valid_user(), iat in time(), exp in time(), now in time(),
        ) {
            let key = TokenKey::from_secret(&[2; 32]);
            let user = UserName::new(&user).unwrap();
            let token = key.mint(&user, iat, exp).unwrap();
            let r = key.verify(&token, now);
            let early = iat > now.saturating_add(TOKEN_LEEWAY_SECS);
            let late = exp.saturating_add(TOKEN_LEEWAY_SECS) <= now;
            match r {
                Ok(claims) => {
                    prop_assert!(!early && !late);
                    prop_assert_eq!((claims.sub, claims.iat, claims.exp), (user, iat, exp));
                }
                Err(TokenError::Expired { .. }) => prop_assert!(!early && late),
                Err(TokenError::Invalid { .. }) => prop_assert!(early),
                Err(TokenError::Missing) => prop_assert!(false, "missing"),
                Err(TokenError::Revoked) => prop_assert!(false, "verify never revokes"),
            }
        }

        #[test]
        fn any_change_to_a_token_is_refused(
            user in names::valid_user(),
            at in any::<Index>(),
            with in prop::sample::select(b"AQgw_-.=+/ Zz09".to_vec()),
            cut in any::<Index>(),
            junk in "[A-Za-z0-9_.=-]{1,8}",
        ) {
            let key = TokenKey::from_secret(&[3; 32]);
            let token = key.mint(&UserName::new(&user).unwrap(), 1000, 2000).unwrap();
            prop_assert!(key.verify(&token, 1500).is_ok());
            let mut changed = token.clone().into_bytes();
            let i = at.index(changed.len());
            prop_assume!(changed[i] != with);
            changed[i] = with;
            let changed = String::from_utf8(changed).unwrap();
            prop_assert!(key.verify(&changed, 1500).is_err(), "{} accepted", changed);
            let truncated = &token[..cut.index(token.len())];
            prop_assert!(key.verify(truncated, 1500).is_err());
            let longer = format!("{token}{junk}");
            prop_assert!(key.verify(&longer, 1500).is_err(), "{} accepted", longer);
        }

        #[test]
        fn well_signed_tokens_with_hostile_claims_are_refused(
            user in names::hostile_user(),
            claims in prop_oneof![
                Just(0u8), Just(1), Just(2), Just(3),
            ],
        ) {
            let secret = [4u8; 32];
            let key = TokenKey::from_secret(&secret);
            let body = match claims {
                0 => json!({"sub": user, "iat": 1000, "exp": 2000}),
                1 => json!({"sub": "bob", "iat": -1, "exp": 2000}),
                2 => json!({"sub": "bob", "exp": 2000}),
                _ => json!({"sub": "bob", "iat": 1000, "exp": "never"}),
            };
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &body,
                &jsonwebtoken::EncodingKey::from_secret(&secret),
            )
            .unwrap();
            let r = key.verify(&token, 1500);
            prop_assert!(matches!(r, Err(TokenError::Invalid { .. })), "{:?}", r);
        }
    }
}

mod peer {
    //! Peer-link frames, their reassembly, and the handshake.

    use brume::ids::GroupName;
    use brume::peer::handshake::{self, HandshakeError, Party, Role};
    use brume::peer::wire::{
        self, Assembler, Frame, HEADER, Inbound, MAX_FRAME, MAX_MESSAGE, Outbound, ResponseStatus,
        WireError, tag,
    };

    use super::*;

    fn status() -> impl Strategy<Value = ResponseStatus> {
        prop::sample::select(vec![
            ResponseStatus::Ok,
            ResponseStatus::NotMember,
            ResponseStatus::Failed,
        ])
    }

    /// Every kind of frame this side sends, encoded.
    fn frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let payload = prop::collection::vec(any::<u8>(), 0..300);
        prop_oneof![
            (user(), any::<[u8; 32]>(), any::<[u8; 32]>())
                .prop_map(|(u, k, n)| vec![wire::hello(&u, k, n).to_vec()]),
            any::<[u8; 32]>().prop_map(|s| {
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(&s);
                vec![wire::auth(sig).to_vec()]
            }),
            any::<String>().prop_map(|r| vec![wire::refuse(&r).to_vec()]),
            (0u8..3, any::<u64>(), names::valid_user(), status(), payload).prop_map(
                |(kind, id, group, status, payload)| {
                    let group = GroupName::new(&group).unwrap();
                    let out = match kind {
                        0 => Outbound::Message,
                        1 => Outbound::Request { id, group: &group },
                        _ => Outbound::Response { id, status },
                    };
                    wire::encode(&out, &payload)
                        .unwrap()
                        .into_iter()
                        .map(|f| f.to_vec())
                        .collect()
                }
            ),
        ]
    }

    /// Any text a `Hello` can carry (up to 255 bytes; real user names are at most 64).
    fn user() -> impl Strategy<Value = String> {
        "\\PC{0,60}"
    }

    fn header(tag: u8, len: u32) -> Vec<u8> {
        let mut f = vec![tag];
        f.extend_from_slice(&len.to_be_bytes());
        f
    }

    proptest! {
        #![proptest_config(cases(1000))]

        #[test]
        fn arbitrary_bytes_are_checked_before_parsing(
            tag in prop_oneof![any::<u8>(), 1u8..4, 0x10u8..0x12, 0x20u8..0x22],
            body in bytes(200),
            honest_length in any::<bool>(),
            len in any::<u32>(),
        ) {
            let mut f = header(tag, if honest_length { body.len() as u32 } else { len });
            f.extend_from_slice(&body);
            match wire::check(&f) {
                Ok((t, b)) => {
                    prop_assert_eq!(t, tag);
                    prop_assert_eq!(b, &body[..]);
                    let _ = wire::parse(t, b);
                }
                Err(WireError::LengthMismatch { declared, actual }) => {
                    prop_assert_eq!((declared, actual), (len as usize, body.len()));
                    prop_assert_ne!(declared, actual);
                }
                Err(WireError::UnknownTag { tag: t }) => prop_assert_eq!(t, tag),
                Err(e) => prop_assert!(false, "unexpected {}", e),
            }
            prop_assert_eq!(wire::decode(&f).is_ok(), wire::check(&f).and_then(|(t, b)| wire::parse(t, b)).is_ok());
        }

        #[test]
        fn every_truncation_and_extension_of_a_frame_is_refused(
            frames in frames(),
            junk in prop::collection::vec(any::<u8>(), 1..16),
        ) {
            for f in &frames {
                prop_assert!(wire::decode(f).is_ok());
                for cut in 0..f.len() {
                    prop_assert!(wire::decode(&f[..cut]).is_err(), "prefix of {} bytes", cut);
                }
                let mut longer = f.clone();
                longer.extend_from_slice(&junk);
                let r = wire::decode(&longer);
                prop_assert!(matches!(r, Err(WireError::LengthMismatch { .. })), "{:?}", r);
            }
        }

        #[test]
        fn handshake_frames_with_trailing_bytes_are_malformed(
            user in user(),
            junk in prop::collection::vec(any::<u8>(), 1..16),
            which in any::<bool>(),
        ) {
            let mut f = if which {
                wire::hello(&user, [1; 32], [2; 32]).to_vec()
            } else {
                wire::auth([3; 64]).to_vec()
            };
            f.extend_from_slice(&junk);
            let len = (f.len() - HEADER) as u32;
            f[1..HEADER].copy_from_slice(&len.to_be_bytes());
            let r = wire::decode(&f);
            prop_assert!(matches!(r, Err(WireError::Malformed { reason: "trailing bytes", .. })), "{:?}", r);
        }

        #[test]
        fn huge_length_prefixes_are_refused_before_allocating(
            declared in (MAX_FRAME as u32 + 1)..=u32::MAX,
            total in (MAX_MESSAGE as u32 + 1)..=u32::MAX,
            kind in 0u8..3,
            chunk in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            // A header announcing more than a frame may hold.
            let mut f = header(tag::MESSAGE, declared);
            f.extend_from_slice(&chunk);
            let (r, largest) = largest_allocation(|| wire::decode(&f).map(|_| ()));
            prop_assert!(r.is_err());
            prop_assert_eq!(largest, 0);
            // A first frame announcing a message beyond MAX_MESSAGE.
            let frame = match kind {
                0 => Frame::Message { total, chunk: &chunk },
                1 => Frame::Request { id: 1, group: "g", total, chunk: &chunk },
                _ => Frame::Response { id: 1, status: ResponseStatus::Ok, total, chunk: &chunk },
            };
            let mut a = Assembler::default();
            let (r, largest) = largest_allocation(|| a.push(frame));
            prop_assert!(matches!(r, Err(WireError::TooBig { what: "message", .. })), "{:?}", r);
            prop_assert!(largest < 4096, "allocated {} bytes", largest);
        }

        #[test]
        fn hostile_group_names_in_requests_are_refused(group in names::hostile_user()) {
            let group = &group.as_bytes()[..group.len().min(255)];
            let mut body = 1u64.to_be_bytes().to_vec();
            body.push(group.len() as u8);
            body.extend_from_slice(group);
            body.extend_from_slice(&0u32.to_be_bytes());
            let mut f = header(tag::REQUEST, body.len() as u32);
            f.extend_from_slice(&body);
            let r = wire::decode(&f).and_then(|frame| Assembler::default().push(frame));
            prop_assert!(r.is_err(), "{:?}", r);
        }
    }

    /// One frame of a hostile sequence: something valid, damaged or invented.
    fn hostile_frame() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            frames().prop_flat_map(|fs| {
                let n = fs.len();
                (Just(fs), 0..n).prop_map(|(fs, i)| fs[i].clone())
            }),
            (
                prop::sample::select(vec![
                    tag::MESSAGE,
                    tag::CONTINUE,
                    tag::REQUEST,
                    tag::RESPONSE
                ]),
                prop_oneof![Just(0u32), Just(1), Just(MAX_MESSAGE as u32), any::<u32>()],
                bytes(64),
            )
                .prop_map(|(t, total, rest)| {
                    let mut body = match t {
                        tag::MESSAGE => total.to_be_bytes().to_vec(),
                        tag::REQUEST => {
                            [&7u64.to_be_bytes()[..], &[1, b'g'], &total.to_be_bytes()].concat()
                        }
                        tag::RESPONSE => [
                            &7u64.to_be_bytes()[..],
                            &200u16.to_be_bytes(),
                            &total.to_be_bytes(),
                        ]
                        .concat(),
                        _ => Vec::new(),
                    };
                    body.extend(rest);
                    let mut f = header(t, body.len() as u32);
                    f.extend(body);
                    f
                }),
            bytes(80),
        ]
    }

    proptest! {
        #![proptest_config(cases(500))]

        #[test]
        fn reassembly_of_hostile_sequences_stays_within_the_announced_bounds(
            seq in prop::collection::vec(hostile_frame(), 1..12),
        ) {
            let mut a = Assembler::default();
            let mut biggest = 0usize;
            for f in &seq {
                let (r, largest) = largest_allocation(|| match wire::decode(f) {
                    Ok(frame) => a.push(frame),
                    Err(e) => Err(e),
                });
                biggest = biggest.max(largest);
                if let Ok(Some(m)) = r {
                    let len = match &m {
                        Inbound::Message(p) => p.len(),
                        Inbound::Request { payload, .. } | Inbound::Response { payload, .. } => payload.len(),
                    };
                    prop_assert!(len <= MAX_MESSAGE);
                }
            }
            // Reserving an announced total is allowed only once it passed the limit.
            prop_assert!(biggest <= MAX_MESSAGE, "allocated {} bytes", biggest);
        }
    }

    fn party() -> impl Strategy<Value = Party> {
        (
            "[a-z]{0,6}",
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            "[a-z0-9: ;-]{0,12}",
        )
            .prop_map(|(user, seed, nonce, fingerprint)| Party {
                user,
                key: seed,
                nonce,
                fingerprint,
            })
    }

    proptest! {
        #![proptest_config(cases(500))]

        #[test]
        fn arbitrary_keys_and_signatures_never_verify(
            key: [u8; 32],
            sig in prop::collection::vec(any::<u8>(), 64),
            transcript in bytes(200),
            offerer: bool,
        ) {
            let sig: [u8; 64] = sig.try_into().unwrap();
            let role = if offerer { Role::Offerer } else { Role::Answerer };
            let r = handshake::verify("x", &key, role, &transcript, &sig);
            prop_assert!(
                matches!(r, Err(HandshakeError::BadKey { .. } | HandshakeError::BadSignature { .. })),
                "{:?}", r
            );
        }

    }

    proptest! {
        // Signing and verifying are slow without optimisations.
        #![proptest_config(cases(48))]

        #[test]
        fn a_genuine_signature_survives_no_change(
            a in party(), b in party(), seed: [u8; 32],
            flip in any::<Index>(), bit in 0u8..8, in_sig: bool,
        ) {
            let signer = ed25519_dalek::SigningKey::from_bytes(&seed);
            let a = Party { key: signer.verifying_key().to_bytes(), ..a };
            let t = handshake::transcript(&a, &b);
            let sig = handshake::sign(&signer, Role::Offerer, &t);
            prop_assert!(handshake::verify(&a.user, &a.key, Role::Offerer, &t, &sig).is_ok());
            prop_assert!(handshake::verify(&a.user, &a.key, Role::Answerer, &t, &sig).is_err());
            let (mut t2, mut sig2) = (t.clone(), sig);
            if in_sig {
                sig2[flip.index(64)] ^= 1 << bit;
            } else {
                let i = flip.index(t2.len());
                t2[i] ^= 1 << bit;
            }
            prop_assert!(handshake::verify(&a.user, &a.key, Role::Offerer, &t2, &sig2).is_err());
        }

    }

    proptest! {
        #![proptest_config(cases(500))]

        #[test]
        fn transcripts_of_different_parties_differ(a in party(), b in party(), c in party(), d in party()) {
            if (&a, &b) != (&c, &d) {
                prop_assert_ne!(handshake::transcript(&a, &b), handshake::transcript(&c, &d));
            }
        }

        #[test]
        fn fingerprints_do_not_depend_on_line_order_or_case(
            lines in prop::collection::vec(prop_oneof![
                "a=fingerprint:(sha-256|SHA-256|sha-1) [0-9A-Fa-f:]{0,20}",
                "[ \t]*a=fingerprint:[^\r\n]{0,20}",
                "[^\r\n]{0,30}",
            ], 0..8),
            shuffle in any::<u64>(),
        ) {
            let sdp = lines.join("\r\n");
            let mut other = lines.clone();
            other.rotate_left((shuffle as usize) % lines.len().max(1));
            let other: Vec<String> = other
                .iter()
                .map(|l| l.to_ascii_uppercase().replace("A=FINGERPRINT:", "a=fingerprint:"))
                .collect();
            let got = handshake::sdp_fingerprints(&sdp, "remote");
            prop_assert_eq!(&got, &handshake::sdp_fingerprints(&other.join("\n"), "remote"));
            if let Ok(fp) = got {
                prop_assert!(!fp.contains(['\r', '\n']));
                prop_assert_eq!(fp.to_ascii_lowercase(), fp.clone());
            }
        }
    }
}

mod sync {
    //! Sync messages between members and owners, and what a member does with them.

    use std::collections::{HashMap, HashSet};

    use brume::blocks::BLOCK_SIZE;
    use brume::catalog::{Catalog, CatalogThread, NodeKind};
    use brume::fs::tree::{Inval, ROOT, Situation, Tree};
    use brume::ids::{GroupId, Ino, UserName};
    use brume::sync::proto::{
        BlockRef, Change, MAX_MESSAGE, MemberToOwner, NodeState, OwnerToMember, Problem, ProtoError,
    };

    use super::*;

    /// Longest symlink target a peer may send.
    const MAX_TARGET: usize = 4096;

    fn name_byte() -> impl Strategy<Value = u8> {
        any::<u8>().prop_map(|b| if b == b'/' || b == 0 { b'x' } else { b })
    }

    /// Names a member may be given: one path component of 1 to 255 bytes.
    fn good_name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(name_byte(), 1..8),
            prop::collection::vec(name_byte(), 1..=255),
            prop::sample::select(vec![
                ".members",
                ".wsserver.json",
                ".brume",
                "...",
                ".brume-moving-1-tmp",
                "a-conflict-sync",
            ])
            .prop_map(|s| s.as_bytes().to_vec()),
        ]
        .prop_map(|n| {
            if n == b"." || n == b".." {
                b"dot".to_vec()
            } else {
                n
            }
        })
    }

    /// Names that would escape the group, break a path or exceed NAME_MAX.
    fn bad_name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::sample::select(vec![
                "",
                ".",
                "..",
                "/",
                "/etc/passwd",
                "../..",
                "a/..",
                "\0"
            ])
            .prop_map(|s| s.as_bytes().to_vec()),
            (
                good_name(),
                any::<Index>(),
                prop::sample::select(vec![b'/', 0u8])
            )
                .prop_map(|(mut n, at, b)| {
                    let i = at.index(n.len() + 1);
                    n.insert(i, b);
                    n
                }),
            prop::collection::vec(name_byte(), 256..600),
        ]
    }

    fn target() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(name_byte(), 0..40),
            Just(b"/etc/passwd".to_vec()),
            Just(b"../../../../etc".to_vec()),
            Just(vec![b'a'; MAX_TARGET]),
        ]
    }

    /// A node that passes validation.
    fn node(
        ids: std::ops::Range<u64>,
        name: impl Strategy<Value = Vec<u8>>,
    ) -> impl Strategy<Value = NodeState> {
        (
            ids.clone(),
            prop_oneof![Just(0u64), ids],
            name,
            1u8..=7,
            any::<u16>(),
            any::<u64>(),
            (any::<i64>(), any::<u32>()),
            any::<u64>(),
            target(),
            prop::collection::vec((any::<[u8; 32]>(), 0..=BLOCK_SIZE as u32), 0..4),
        )
            .prop_map(
                |(id, parent, name, kind, perm, size, mtime, version, target, blocks)| {
                    let blocks: Vec<BlockRef> = if kind == 1 {
                        blocks
                            .into_iter()
                            .map(|(hash, len)| BlockRef { hash, len })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    NodeState {
                        id,
                        parent,
                        name,
                        kind,
                        perm,
                        size: if kind == 1 {
                            blocks.iter().map(|b| u64::from(b.len)).sum()
                        } else {
                            size
                        },
                        mtime,
                        version,
                        target: (kind == 3).then_some(target),
                        blocks,
                        list: None,
                        xattrs: Vec::new(),
                    }
                },
            )
    }

    fn any_node() -> impl Strategy<Value = NodeState> {
        node(0..u64::MAX, good_name())
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            3 => any_node().prop_map(Change::Upsert),
            1 => any::<u64>().prop_map(|id| Change::Remove { id }),
        ]
    }

    fn owner_msg() -> impl Strategy<Value = OwnerToMember> {
        let group = "\\PC{0,12}";
        prop_oneof![
            any::<u16>().prop_map(|version| OwnerToMember::Hello { version }),
            (
                group,
                any::<u64>(),
                prop::collection::vec(any_node(), 0..4),
                any::<bool>()
            )
                .prop_map(|(group, seq, nodes, last)| OwnerToMember::Snapshot {
                    epoch: seq ^ 5,
                    settled: seq,
                    group,
                    seq,
                    nodes,
                    last,
                    unsettled: vec![seq],
                }),
            (group, any::<u64>(), prop::collection::vec(change(), 0..4)).prop_map(
                |(group, seq, changes)| OwnerToMember::Changes {
                    group,
                    seq,
                    changes
                }
            ),
            (
                group,
                any::<[u8; 32]>(),
                prop::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(group, hash, data)| OwnerToMember::Block {
                    group,
                    hash,
                    data
                }),
            (group, any::<[u8; 32]>())
                .prop_map(|(group, hash)| OwnerToMember::NoBlock { group, hash }),
            (group, 0..3u8).prop_map(|(group, p)| OwnerToMember::Refused {
                group,
                problem: [Problem::NotMember, Problem::Held, Problem::Busy][usize::from(p)],
            }),
        ]
    }

    fn member_msg() -> impl Strategy<Value = MemberToOwner> {
        let group = "\\PC{0,12}";
        prop_oneof![
            any::<u16>().prop_map(|version| MemberToOwner::Hello { version }),
            (group, any::<u64>()).prop_map(|(group, since)| MemberToOwner::Subscribe {
                group,
                epoch: since >> 3,
                since
            }),
            group.prop_map(|group| MemberToOwner::Unsubscribe { group }),
            (
                group,
                any::<u64>(),
                any::<u32>(),
                any::<[u8; 32]>(),
                any::<bool>()
            )
                .prop_map(|(group, id, index, hash, urgent)| MemberToOwner::GetBlock {
                    group,
                    id,
                    index,
                    hash,
                    urgent
                }),
            (group, any::<u64>()).prop_map(|(group, seq)| MemberToOwner::Ack {
                group,
                epoch: seq >> 1,
                seq
            }),
        ]
    }

    /// Encodings of both directions, with a flag telling which.
    fn encoded() -> impl Strategy<Value = (bool, Vec<u8>)> {
        prop_oneof![
            owner_msg().prop_map(|m| (true, m.encode())),
            member_msg().prop_map(|m| (false, m.encode())),
        ]
    }

    fn decodes(owner: bool, bytes: &[u8]) -> Result<(), ProtoError> {
        if owner {
            OwnerToMember::decode(bytes).map(|_| ())
        } else {
            MemberToOwner::decode(bytes).map(|_| ())
        }
    }

    /// What `NodeState::validate` must accept, as a list of rules.
    fn acceptable(n: &NodeState) -> bool {
        let name_ok = !n.name.is_empty()
            && n.name.len() <= 255
            && n.name != b"."
            && n.name != b".."
            && !n.name.iter().any(|b| *b == b'/' || *b == 0);
        let target_ok = n
            .target
            .as_ref()
            .is_none_or(|t| t.len() <= MAX_TARGET && !t.contains(&0));
        let sum: u64 = n.blocks.iter().map(|b| u64::from(b.len)).sum();
        name_ok
            && target_ok
            && (1..=7).contains(&n.kind)
            && (n.kind != 1 || sum == n.size)
            && n.blocks.iter().all(|b| u64::from(b.len) <= BLOCK_SIZE)
    }

    /// A valid node with one field made hostile, or left alone.
    fn hostile_node() -> impl Strategy<Value = NodeState> {
        (
            any_node(),
            0u8..7,
            bad_name(),
            any::<u8>(),
            any::<u64>(),
            bytes(40),
            any::<u32>(),
        )
            .prop_map(|(mut n, what, name, kind, size, target, len)| {
                match what {
                    0 => n.name = name,
                    1 => n.kind = kind,
                    2 => n.size = size,
                    3 => n.target = Some([&target[..], b"\0"].concat()),
                    4 => n.target = Some(vec![b'a'; MAX_TARGET + 1 + target.len()]),
                    5 => n.blocks.push(BlockRef { hash: [0; 32], len }),
                    _ => {}
                }
                n
            })
    }

    proptest! {
        #![proptest_config(cases(1000))]

        #[test]
        fn every_message_round_trips(m in owner_msg(), k in member_msg()) {
            prop_assert_eq!(OwnerToMember::decode(&m.encode()).unwrap(), m);
            prop_assert_eq!(MemberToOwner::decode(&k.encode()).unwrap(), k);
        }

        #[test]
        fn validation_accepts_exactly_what_is_safe(n in hostile_node()) {
            prop_assert_eq!(n.validate().is_ok(), acceptable(&n), "{:?}", n);
            // And decoding applies it to every node a message carries.
            let changes = OwnerToMember::Changes {
                group: "g".into(),
                seq: 1,
                changes: vec![Change::Remove { id: 1 }, Change::Upsert(n.clone())],
            };
            let snapshot = OwnerToMember::Snapshot { group: "g".into(), epoch: 0, seq: 1, settled: 1, nodes: vec![n.clone()], last: true, unsettled: vec![] };
            for m in [changes, snapshot] {
                match OwnerToMember::decode(&m.encode()) {
                    Ok(d) => {
                        prop_assert!(acceptable(&n));
                        prop_assert_eq!(d, m);
                    }
                    Err(e) => {
                        prop_assert!(!acceptable(&n));
                        prop_assert!(matches!(e, ProtoError::Invalid { .. }), "{:?}", e);
                    }
                }
            }
        }

        #[test]
        fn hostile_names_are_always_refused(name in bad_name(), n in any_node()) {
            let n = NodeState { name, ..n };
            let r = n.validate();
            prop_assert!(matches!(r, Err(ProtoError::Invalid { .. })), "{:?}", r);
        }

        #[test]
        fn every_truncation_and_extension_is_refused(
            (owner, bytes) in encoded(),
            junk in prop::collection::vec(any::<u8>(), 1..16),
        ) {
            prop_assert!(decodes(owner, &bytes).is_ok());
            // Every strict prefix misses bytes the full decode read.
            let step = (bytes.len() / 400).max(1);
            for cut in (0..bytes.len()).step_by(step).chain(bytes.len().saturating_sub(8)..bytes.len()) {
                prop_assert!(decodes(owner, &bytes[..cut]).is_err(), "prefix of {} bytes", cut);
            }
            let mut longer = bytes.clone();
            longer.extend_from_slice(&junk);
            let r = decodes(owner, &longer);
            prop_assert!(matches!(r, Err(ProtoError::Malformed { .. })), "{:?}", r);
            // One direction's messages never pass for the other's.
            prop_assert!(decodes(!owner, &bytes).is_err());
        }

        #[test]
        fn flipped_bits_never_panic_or_overallocate(
            (owner, mut bytes) in encoded(),
            flips in prop::collection::vec((any::<Index>(), 0u8..8), 1..6),
        ) {
            for (at, bit) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
            let (r, largest) = largest_allocation(|| decodes(owner, &bytes));
            prop_assert!(largest <= 2 << 20, "allocated {} bytes", largest);
            if let (true, Ok(())) = (owner, r) {
                // Anything that decodes was validated.
                if let Ok(OwnerToMember::Snapshot { nodes, .. }) = OwnerToMember::decode(&bytes) {
                    prop_assert!(nodes.iter().all(acceptable));
                }
            }
        }

        #[test]
        fn huge_length_prefixes_are_refused_before_allocating(
            (owner, bytes) in encoded(),
            at in any::<Index>(),
            len in huge_len(),
            tail in bytes(64),
        ) {
            // A length prefix spliced in anywhere: a string, a byte vector, a node
            // list or a change list claims gigabytes that are not there.
            let i = 1 + at.index(bytes.len());
            let mut hostile = bytes[..i.min(bytes.len())].to_vec();
            hostile.extend(varint(len));
            hostile.extend(tail);
            let (r, largest) = largest_allocation(|| decodes(owner, &hostile));
            prop_assert!(largest <= 2 << 20, "allocated {} bytes", largest);
            let _ = r;
        }
    }

    #[test]
    fn crafted_huge_lengths_in_every_field_are_refused_before_allocating() {
        let hash = [9u8; 32];
        let huge = [u64::from(u32::MAX), 4 << 30, u64::MAX >> 1, u64::MAX];
        for len in huge {
            let n = varint(len);
            let g = [&varint(1)[..], b"g"].concat();
            let node_head = [&varint(7)[..], &varint(0)].concat();
            let cases: Vec<Vec<u8>> = vec![
                // Block { group, hash, data: <len> }
                [&[b'O', 3][..], &g, &hash, &n, b"abc"].concat(),
                // Snapshot { group, seq, nodes: <len> }
                [&[b'O', 1][..], &g, &varint(1), &n, b"abc"].concat(),
                // Changes { group, seq, changes: <len> }
                [&[b'O', 2][..], &g, &varint(1), &n].concat(),
                // Snapshot with one node whose name claims <len> bytes
                [
                    &[b'O', 1][..],
                    &g,
                    &varint(1),
                    &varint(1),
                    &node_head,
                    &n,
                    b"x",
                ]
                .concat(),
                // Refused { group, problem: <huge variant index> }
                [&[b'O', 5][..], &g, &n, b"E"].concat(),
                // Snapshot { group, seq, nodes: [], last, unsettled: <len> }
                [&[b'O', 1][..], &g, &varint(1), &varint(0), &[1], &n, b"abc"].concat(),
                // BlockList { group, id, hash, from, blocks: <len> }
                [
                    &[b'O', 6][..],
                    &g,
                    &varint(1),
                    &hash,
                    &varint(0),
                    &n,
                    b"abc",
                ]
                .concat(),
                // Hello-less member messages: Subscribe { group: <len> }
                [&[b'M', 1][..], &n, b"g"].concat(),
            ];
            for (i, bytes) in cases.iter().enumerate() {
                let (r, largest) = largest_allocation(|| decodes(bytes[0] == b'O', bytes));
                assert!(
                    matches!(r, Err(ProtoError::Malformed { .. })),
                    "case {i}, length {len}: {r:?}"
                );
                assert!(
                    largest <= 2 << 20,
                    "case {i}, length {len}: allocated {largest} bytes"
                );
            }
        }
        let big = vec![b'O'; MAX_MESSAGE + 1];
        let (r, largest) = largest_allocation(|| OwnerToMember::decode(&big));
        assert_eq!(
            r,
            Err(ProtoError::TooLarge {
                len: MAX_MESSAGE + 1
            })
        );
        assert_eq!(largest, 0);
    }

    /// A member (alice) that joined bob's group `photos`: its tree, and the
    /// catalog actor behind it (dropped after the tree).
    struct Member {
        tree: Tree,
        _catalog: CatalogThread,
        _dir: tempfile::TempDir,
        g: GroupId,
        root: Ino,
    }

    fn member() -> Member {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, snapshot, thread) = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let me = UserName::new("alice").unwrap();
        let (mut tree, _) = Tree::load(snapshot, me, 0, 0, catalog).unwrap();
        let bob = tree
            .create(ROOT, b"bob", NodeKind::Dir, 0o755, 0, 0, 0, None)
            .unwrap();
        let root = tree
            .create(bob, b"photos", NodeKind::Dir, 0o755, 0, 0, 0, None)
            .unwrap();
        let g = tree.find_group("bob", "photos").unwrap();
        Member {
            tree,
            _catalog: thread,
            _dir: dir,
            g,
            root,
        }
    }

    fn children(tree: &Tree, dir: Ino) -> HashMap<Vec<u8>, Ino> {
        tree.get(dir)
            .unwrap()
            .children
            .as_ref()
            .map(|c| c.iter().map(|(n, i)| (n.clone(), *i)).collect())
            .unwrap_or_default()
    }

    /// What a hostile owner sends: changes among a few ids, so nodes nest, move
    /// and replace each other; some of them invalid.
    fn owner_change() -> impl Strategy<Value = Change> {
        let name = prop_oneof![
            4 => prop::sample::select(vec!["a", "b", ".members", ".wsserver.json", "a-conflict-sync", ".brume-moving-3-tmp"])
                .prop_map(|s| s.as_bytes().to_vec()),
            1 => good_name(),
            1 => bad_name(),
        ];
        prop_oneof![
            4 => node(1..8, name).prop_map(Change::Upsert),
            1 => (1u64..8).prop_map(|id| Change::Remove { id }),
        ]
    }

    proptest! {
        #![proptest_config(cases(64))]

        #[test]
        fn a_hostile_owner_cannot_escape_the_group_or_grant_privileges(
            changes in prop::collection::vec(owner_change(), 1..24),
            sync in any::<bool>(),
        ) {
            let mut m = member();
            let root_before = children(&m.tree, ROOT);
            let bob = m.tree.get(m.root).unwrap().parent;
            let bob_before = children(&m.tree, bob);
            let situation = if sync { Situation::Sync } else { Situation::Update };
            let mut out: Vec<Inval> = Vec::new();
            for c in changes {
                // As the engine gets them: one message, decoded (and validated) first.
                let bytes = OwnerToMember::Changes { group: "photos".into(), seq: 1, changes: vec![c] }.encode();
                let Ok(OwnerToMember::Changes { changes, .. }) = OwnerToMember::decode(&bytes) else {
                    continue;
                };
                for c in &changes {
                    let _ = match c {
                        Change::Upsert(n) => m.tree.apply_upsert(m.g, n, situation, &mut out),
                        Change::Remove { id } => m.tree.apply_remove(m.g, *id, situation, &mut out).map(|_| ()),
                    };
                }
            }
            // Nothing outside the group changed.
            prop_assert_eq!(children(&m.tree, ROOT), root_before);
            prop_assert_eq!(children(&m.tree, bob), bob_before);
            prop_assert!(m.tree.members_file_group(m.root, b".members").is_none());
            prop_assert!(m.tree.group(m.g).unwrap().members.is_empty());
            // Inside: a tree of valid names, no setuid or setgid bits.
            let mut seen = HashSet::new();
            let mut queue = vec![m.root];
            while let Some(dir) = queue.pop() {
                for (name, ino) in children(&m.tree, dir) {
                    prop_assert!(seen.insert(ino), "{:?} reached twice", ino);
                    prop_assert!(!name.is_empty() && name.len() <= 255);
                    prop_assert!(name != b"." && name != b"..");
                    prop_assert!(!name.contains(&b'/') && !name.contains(&0));
                    let n = m.tree.get(ino).unwrap();
                    prop_assert_eq!(n.row.group, Some(m.g));
                    prop_assert_eq!(
                        u32::from(n.row.perm) & (libc::S_ISUID | libc::S_ISGID),
                        0,
                        "{:?} has mode {:o}", String::from_utf8_lossy(&name), n.row.perm
                    );
                    if n.children.is_some() {
                        prop_assert_eq!(n.parent, dir);
                        queue.push(ino);
                    }
                }
            }
        }
    }

    #[test]
    fn mirrored_nodes_never_carry_setuid_or_setgid() {
        let mut m = member();
        let mut out = Vec::new();
        let file = |perm| NodeState {
            id: 5,
            parent: 0,
            name: b"run-me".to_vec(),
            kind: 1,
            perm,
            size: 0,
            mtime: (0, 0),
            version: 1,
            target: None,
            blocks: Vec::new(),
            list: None,
            xattrs: Vec::new(),
        };
        let dir = NodeState {
            id: 6,
            name: b"d".to_vec(),
            kind: 2,
            perm: 0o2775,
            ..file(0)
        };
        // Created with the bits, then updated to them.
        for (state, want) in [
            (file(0o4755), 0o755),
            (dir.clone(), 0o775),
            (file(0o755), 0o755),
            (file(0o6711), 0o711),
            (
                NodeState {
                    perm: 0o3777,
                    ..dir
                },
                0o1777,
            ),
        ] {
            m.tree
                .apply_upsert(m.g, &state, Situation::Update, &mut out)
                .unwrap();
            let ino = m.tree.child(m.root, &state.name).unwrap();
            assert_eq!(m.tree.get(ino).unwrap().row.perm, want, "{:o}", state.perm);
        }
    }
}
