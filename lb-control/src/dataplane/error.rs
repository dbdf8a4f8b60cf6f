//! Errors of the data plane, each saying what to do next.

use std::{io, path::PathBuf};

use aya::{EbpfError, maps::MapError, programs::ProgramError};
use thiserror::Error;

use super::{AttachedMode, SpecProblem, bpffs::BpffsError};

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error(
        "lb-control needs root (CAP_BPF and CAP_NET_ADMIN) to load and attach the XDP program; \
         run it as root or with sudo"
    )]
    NotRoot,
    #[error("no interfaces to attach to; name at least one with --interface or in the config")]
    NoInterfaces,
    #[error(
        "interface \"{name}\" does not exist in this network namespace; `ip link` lists the \
         interfaces there"
    )]
    NoSuchInterface { name: String },
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error("creating the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "renaming the map pinned as {from} to {to}, its current name: {source}; rename it by \
         hand, or remove it (its contents are then lost)"
    )]
    RenamePin {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "counting this host's possible CPUs (the flow cache has slots for each): {what}: {source}"
    )]
    Cpus {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("loading the XDP object: {source}")]
    Load {
        #[source]
        source: EbpfError,
    },
    #[error("the XDP object has no program named {name}; the build is broken, rebuild lb-control")]
    MissingProgram { name: &'static str },
    #[error("the XDP object has no map named {name}; the build is broken, rebuild lb-control")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "the kernel's verifier rejected program {name} ({source}); its log follows, the last \
         lines say why:\n{verifier_log}"
    )]
    VerifierRejected {
        name: &'static str,
        #[source]
        source: io::Error,
        verifier_log: String,
    },
    #[error(
        "attaching the XDP program to {interface} in {mode} mode: {source}; {hint}",
        hint = attach_hint(*mode)
    )]
    Attach {
        interface: String,
        mode: AttachedMode,
        #[source]
        source: ProgramError,
    },
    #[error("pinned XDP link {path}: {reason}; remove the file to attach afresh")]
    LinkPin { path: PathBuf, reason: String },
    #[error(
        "opening pinned map {path}: {source}; is an lb-control instance of that name running \
         (check --instance and --bpffs)?"
    )]
    OpenPinned {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "the wanted load balancer state is invalid:\n  {}",
        .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  ")
    )]
    InvalidState { problems: Vec<SpecProblem> },
    #[error(
        "the pinned Maglev tables have {pinned} entries each, the config asks for {wanted}; \
         keep the old size, or stop lb-control and remove its pin directory to start afresh \
         (established flows are lost)"
    )]
    MaglevSizeChanged { pinned: u32, wanted: u32 },
    #[error("service {service}: building its Maglev table: {source}")]
    Maglev {
        service: String,
        #[source]
        source: lb_common::maglev::MaglevError,
    },
    #[error("reserving NAT source ports from the kernel ({path}): {source}")]
    ReservePorts {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the blocklist's kernel call did not finish: {source}")]
    BlocklistCall {
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("map {name}: batch read or delete: {source}")]
    MapBatch {
        name: &'static str,
        #[source]
        source: io::Error,
    },
}

fn attach_hint(mode: AttachedMode) -> &'static str {
    match mode {
        AttachedMode::Native => {
            "the driver may lack native XDP: try --xdp-mode generic, or check that no other XDP \
             program is attached (`ip link show`)"
        }
        AttachedMode::Generic => {
            "check that no other XDP program is attached to the interface (`ip link show`)"
        }
    }
}

impl DataplaneError {
    /// Keeps the verifier's log, which is the only useful part of a rejection.
    pub(super) fn from_load_failure(name: &'static str, source: ProgramError) -> Self {
        match source {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => DataplaneError::VerifierRejected {
                name,
                source: io_error,
                verifier_log: verifier_log.to_string(),
            },
            source => DataplaneError::Program { name, source },
        }
    }
}
