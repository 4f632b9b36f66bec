//! The policies' names as job files and the API spell them, one table per policy, so
//! reading and writing a name can never disagree.

use super::{CatchUp, OnClosedDay, OnFold, OnGap, Overlap};

macro_rules! named {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }

            pub fn parse(s: &str) -> Option<$ty> {
                match s {
                    $($name => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

named!(OnClosedDay {
    Skip => "skip",
    PreviousOpen => "previous_open",
    NextOpen => "next_open",
    Run => "run",
});

named!(OnGap {
    Shift => "shift",
    Skip => "skip",
});

named!(OnFold {
    First => "first",
    Both => "both",
});

named!(Overlap {
    Skip => "skip",
    BufferOne => "buffer_one",
    BufferAll => "buffer_all",
    CancelOther => "cancel_other",
    Allow => "allow",
});

named!(CatchUp {
    None => "none",
    Latest => "latest",
    All => "all",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_round_trip() {
        for n in OnClosedDay::NAMES {
            assert_eq!(OnClosedDay::parse(n).unwrap().as_str(), *n);
        }
        for n in OnGap::NAMES {
            assert_eq!(OnGap::parse(n).unwrap().as_str(), *n);
        }
        for n in OnFold::NAMES {
            assert_eq!(OnFold::parse(n).unwrap().as_str(), *n);
        }
        for n in Overlap::NAMES {
            assert_eq!(Overlap::parse(n).unwrap().as_str(), *n);
        }
        for n in CatchUp::NAMES {
            assert_eq!(CatchUp::parse(n).unwrap().as_str(), *n);
        }
        assert_eq!(Overlap::parse("Skip"), None);
        assert_eq!(CatchUp::default().as_str(), "latest");
    }
}
