//! Support for runvm's integration tests.
//!
//! Tests that need a KVM able to boot Linux are declared with [`kvm_test!`].
//! On a machine with VT-x/AMD-V they run in place; elsewhere the test binary
//! re-runs that one test inside the QEMU TCG test host
//! (`tests/testhost/testhost.sh`) and checks there that it passed.

pub mod artifacts;
pub mod guest;
pub mod host;
pub mod kernel_symbols;
pub mod kvm;
pub mod netns;
pub mod smaps;

/// Declares a test that runs where KVM can boot a Linux guest.
#[macro_export]
macro_rules! kvm_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            let path = concat!(module_path!(), "::", stringify!($name));
            if $crate::kvm::run_here_or_in_testhost(path) {
                $body
            }
        }
    };
}
