//! thinbd-csi: the Kubernetes CSI plugin. The services arrive with the CSI issue; until then the
//! binary says so instead of pretending to work.

fn main() {
    eprintln!("thinbd-csi: the CSI services are not implemented yet");
    std::process::exit(2);
}
