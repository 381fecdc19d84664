//! Identities that cross module boundaries: user and group names, inode numbers,
//! change-log positions, versions and block hashes. Each is a newtype so that a
//! sequence number can never be passed where an inode number is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Names no user or group may take: they collide with Brume's own files or with
/// path syntax.
const RESERVED: &[&str] = &[".", "..", ".members", ".wsserver.json", ".brume"];

/// Why a user or group name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: {reason}")]
pub struct InvalidName {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn check_name(name: &str) -> Result<(), InvalidName> {
    let fail = |reason| {
        Err(InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("empty");
    }
    if name.len() > 64 {
        return fail("longer than 64 bytes");
    }
    if RESERVED.contains(&name) {
        return fail("reserved");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return fail("must not start with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return fail("only ASCII letters, digits, '_', '-' and '.' are allowed");
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name: safe as one path component, not reserved.
            pub fn new(name: &str) -> Result<Self, InvalidName> {
                check_name(name)?;
                Ok(Self(name.to_owned()))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                check_name(&s)?;
                Ok(Self(s))
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A Brume account name, safe as a path component.
    UserName
);
name_type!(
    /// A group's name within its owner's namespace, safe as a path component.
    GroupName
);

macro_rules! number_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

number_type!(
    /// A node of the catalog's namespace; also the FUSE inode number.
    Ino
);
number_type!(
    /// A group's id in the local catalog.
    GroupId
);
number_type!(
    /// A position in a group's change log; strictly increasing per group.
    Seq
);
number_type!(
    /// A node's version: the change-log position of its last change.
    Version
);

/// BLAKE3 hash of one block of file content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({self})")
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_path_safe() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            ".members",
            "-x",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(UserName::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["alice", "bob_2", "group-1", "a.b"] {
            assert_eq!(GroupName::new(good).unwrap().as_str(), good);
        }
    }
}
