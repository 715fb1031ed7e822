//! Request paths, normalized before routing and authorization, so that a
//! policy on `/admin` also covers `//admin`, `/./admin`, `/a/../admin` and
//! `/%61dmin`, and the app receives the path the policy saw:
//!
//! 1. percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!    decoded; other escapes keep their meaning, in upper-case hex;
//! 2. an encoded slash or backslash (`%2F`, `%5C`) is refused: an app that
//!    decodes it would see a path the policy never saw (MeshConfig
//!    `encodedSlashes: PassThrough` forwards it encoded instead); a literal
//!    backslash is refused too (some apps read it as a slash);
//! 3. repeated slashes are merged;
//! 4. dot segments are removed (RFC 3986 §5.2.4).
//!
//! The common path (nothing to change) is checked without allocating.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has an encoded slash or backslash (%2F, %5C)")]
    EncodedSlash,
    #[error("the path has a backslash")]
    Backslash,
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    #[error("the path does not start with /")]
    NotAbsolute,
}

/// What to do with `%2F` and `%5C`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EncodedSlashes {
    /// 400 (the default).
    #[default]
    Reject,
    /// Forwarded as they are (never decoded).
    PassThrough,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `path` is already normal: no escapes to touch, no backslash,
/// no empty or dot segments.
fn is_normal(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    let mut prev = 0u8;
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'%' | b'\\' => return false,
            b'/' if prev == b'/' => return false,
            b'.' if prev == b'/' => {
                // "/." followed by end, "/" or "." is a dot segment.
                match path.get(i + 1) {
                    None | Some(b'/') => return false,
                    Some(b'.') if matches!(path.get(i + 2), None | Some(b'/')) => return false,
                    _ => {}
                }
            }
            _ => {}
        }
        prev = b;
    }
    true
}

/// The normalized form of an origin-form path (no query), or why it is
/// refused.
pub fn normalize(path: &str, slashes: EncodedSlashes) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if is_normal(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // 1 and 2: escapes.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).and_then(|c| hex(*c)),
                    bytes.get(i + 2).and_then(|c| hex(*c)),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let c = h << 4 | l;
                if is_unreserved(c) {
                    decoded.push(c);
                } else if (c == b'/' || c == b'\\') && slashes == EncodedSlashes::Reject {
                    return Err(PathError::EncodedSlash);
                } else {
                    decoded.push(b'%');
                    decoded.extend_from_slice(format!("{c:02X}").as_bytes());
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // 3 and 4: segments. An escaped slash stays inside its segment.
    let mut out: Vec<&[u8]> = Vec::new();
    let trailing = decoded.ends_with(b"/");
    let mut last_was_dot = false;
    for seg in decoded[1..].split(|b| *b == b'/') {
        last_was_dot = false;
        match seg {
            b"" => {}
            b"." => last_was_dot = true,
            b".." => {
                out.pop();
                last_was_dot = true;
            }
            s => out.push(s),
        }
    }
    let mut s = Vec::with_capacity(decoded.len());
    for seg in &out {
        s.push(b'/');
        s.extend_from_slice(seg);
    }
    if s.is_empty() || trailing || last_was_dot {
        s.push(b'/');
    }
    // Only ASCII went in (a `str`, escapes re-encoded as ASCII), and the
    // decoded characters are unreserved ASCII.
    String::from_utf8(s)
        .map(Cow::Owned)
        .map_err(|_| PathError::BadEscape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, EncodedSlashes::Reject).map(|c| c.into_owned())
    }

    #[test]
    fn bypass_forms_become_the_path_they_mean() {
        for p in [
            "/admin",
            "//admin",
            "/./admin",
            "/x/../admin",
            "/%61dmin",
            "/%2e/admin",
            "/%2E%2E/admin",
            "///admin",
            "/a/b/../../admin",
            "/../admin",
        ] {
            assert_eq!(n(p).unwrap(), "/admin", "{p}");
        }
        assert_eq!(n("/admin/").unwrap(), "/admin/");
        assert_eq!(n("/admin/.").unwrap(), "/admin/");
        assert_eq!(n("/admin/x/..").unwrap(), "/admin/");
        assert_eq!(n("/").unwrap(), "/");
        assert_eq!(n("/..").unwrap(), "/");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert_eq!(n("/a%7eb").unwrap(), "/a~b");
        assert_eq!(n("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(n("/.well-known/x").unwrap(), "/.well-known/x");
        assert_eq!(n("/a..b/c.").unwrap(), "/a..b/c.");
    }

    #[test]
    fn normal_paths_are_not_copied() {
        for p in [
            "/",
            "/admin",
            "/a/b.c/d",
            "/.well-known/acme",
            "/a..b",
            "/x.",
        ] {
            assert!(
                matches!(normalize(p, EncodedSlashes::Reject), Ok(Cow::Borrowed(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn encoded_slashes_and_backslashes() {
        assert_eq!(n("/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/a%5Cb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/a\\b"), Err(PathError::Backslash));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%2"), Err(PathError::BadEscape));
        assert_eq!(n("a/b"), Err(PathError::NotAbsolute));
        // Passed through: kept encoded, inside its segment.
        let pass = |p| normalize(p, EncodedSlashes::PassThrough).map(|c| c.into_owned());
        assert_eq!(pass("/a%2fb/../c").unwrap(), "/c");
        assert_eq!(pass("/x/a%2fb").unwrap(), "/x/a%2Fb");
    }
}
