//! Redis key encoding: `<prefix>{<key>}<suffix>` holds the whole key inside its hash tag,
//! no two keys share a Redis key, and the argument the scripts get is the same text.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tower_redis_lock::__fuzz::redis_key;

#[derive(Arbitrary, Debug)]
struct Input {
    prefix: String,
    key: String,
    other: String,
    suffix: u8,
}

const SUFFIXES: [&str; 5] = ["", ":fence", ":waiters", ":released", ":response"];

/// The slot text Redis hashes: between the first `{` and the first `}` after it, when
/// that is not empty (else the whole key).
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')? + open + 1;
    (close > open + 1).then(|| &key[open + 1..close])
}

/// The inverse of the backend's encoding: `%7D` → `}`, `%25` → `%`, a lone `%` → "".
/// That one exists and gives back every key proves the encoding is injective.
fn decode(tag: &str) -> Option<String> {
    if tag == "%" {
        return Some(String::new());
    }
    let mut out = String::new();
    let mut rest = tag;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3)? {
            "%7D" => out.push('}'),
            "%25" => out.push('%'),
            _ => return None,
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

fuzz_target!(|input: Input| {
    // `key_prefix` refuses braces (it panics, by contract); the default is `lock:`.
    let prefix = if input.prefix.contains(['{', '}']) {
        "lock:"
    } else {
        input.prefix.as_str()
    };
    let suffix = SUFFIXES[usize::from(input.suffix) % SUFFIXES.len()];
    let (name, arg) = redis_key(prefix, &input.key, suffix);
    assert_eq!(
        name.as_bytes(),
        &arg[..],
        "the script argument is the key's name"
    );

    // Prefix first, then the tag, then the suffix, nothing else.
    let rest = name.strip_prefix(prefix).expect("the prefix comes first");
    let rest = rest.strip_suffix(suffix).expect("the suffix comes last");
    let tag = rest
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .expect("the key sits in braces");
    assert_eq!(
        hash_tag(&name),
        Some(tag),
        "Redis hashes the whole key, and only it"
    );
    assert_eq!(
        decode(tag).as_deref(),
        Some(input.key.as_str()),
        "the tag gives back the key"
    );

    // Two keys, one Redis key: only if they are the same key.
    let (other, _) = redis_key(prefix, &input.other, suffix);
    assert_eq!(
        other == name,
        input.other == input.key,
        "{other:?} vs {name:?}"
    );
    // And the lock of one key is never another key's counter, channel or record.
    for other_suffix in SUFFIXES.iter().filter(|s| **s != suffix) {
        let (other, _) = redis_key(prefix, &input.other, other_suffix);
        assert_ne!(other, name);
    }
});
