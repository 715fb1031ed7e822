//! remora-control: the control plane. A skeleton until the control-plane
//! issue lands; remoractl already validates config offline.
#![forbid(unsafe_code)]
