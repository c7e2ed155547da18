//! Signed-envelope decoding of untrusted bytes, for every signed kind: must never panic; an
//! accepted envelope must be canonical (`to_bytes()` gives back the input exactly), and
//! signature verification (`valid_signers`) must not panic on whatever keys and signatures
//! it carries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollen_protocol::manifest::Manifest;
use pollen_protocol::rollout::{HealthReportBody, InstructionBody};
use pollen_protocol::signing::{Signed, SignedBody};
use pollen_protocol::trust::{NodeCertBody, TrustRootBody};

fn check_signed<T: SignedBody>(data: &[u8]) {
    if let Ok((signed, _body)) = Signed::<T>::from_bytes(data) {
        assert_eq!(signed.to_bytes(), data, "accepted a non-canonical envelope");
        signed
            .check_envelope()
            .expect("from_bytes accepted an envelope check_envelope refuses");
        let signers = signed.valid_signers(|_| true);
        assert!(signers.len() <= signed.signatures().len());
        // The body decodes again the same way from the stored bytes.
        assert!(signed.decode_body().is_ok());
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::from_bytes(data) {
        assert_eq!(
            m.signed.to_bytes(),
            data,
            "accepted a non-canonical manifest envelope"
        );
        assert_eq!(m.id.0, m.signed.body_hash());
        let signers = m.signed.valid_signers(|_| true);
        assert!(signers.len() <= m.signed.signatures().len());
    }
    check_signed::<TrustRootBody>(data);
    check_signed::<NodeCertBody>(data);
    check_signed::<HealthReportBody>(data);
    check_signed::<InstructionBody>(data);
});
