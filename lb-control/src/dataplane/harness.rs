//! Runs XDP programs on frames through BPF_PROG_TEST_RUN, attached nowhere: the packet
//! fixtures (the program's specification) and the XDP benchmark drive the load balancer
//! through [`ProgramHarness`], and the benchmark's reference programs through
//! [`ReferenceProgram`].
//!
//! Test-only: compiled with the `test-harness` feature, which lb-control's tests and examples
//! turn on (through its dev-dependency on itself) and the daemon does not.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::program_names;

use super::{
    ApplyReport, DataplaneError, LbSettings, MapSizes, ProtoStats, ServiceSpec, XDP_PASS_OBJECT,
    load_lb_object, loaded_proto_stats, prepare_pin_dir, require_root, service_maps, services,
    xdp_program,
};

/// The XDP benchmark's reference: the load balancer's parser, then XDP_PASS.
static XDP_PARSE_PASS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-parse-pass"));

/// An XDP verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAction {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    Unknown(u32),
}

impl From<u32> for XdpAction {
    fn from(code: u32) -> Self {
        match code {
            0 => XdpAction::Aborted,
            1 => XdpAction::Drop,
            2 => XdpAction::Pass,
            3 => XdpAction::Tx,
            4 => XdpAction::Redirect,
            other => XdpAction::Unknown(other),
        }
    }
}

/// What one run of the program did to a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestVerdict {
    pub action: XdpAction,
    /// The frame as the program left it.
    pub output: Vec<u8>,
}

/// The load balancer program, loaded with maps of its own pinned under `<bpffs>/<instance>/`,
/// which are removed again on drop.
pub struct ProgramHarness {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    known: services::KernelState,
}

/// The sizes a harness loads its maps with: the defaults.
const HARNESS_MAP_SIZES: MapSizes = MapSizes {
    maglev_table_size: lb_common::maglev::DEFAULT_TABLE_SIZE,
    max_flows: lb_common::maps::DEFAULT_MAX_FLOWS,
};

/// Room for the largest frame a test sends plus any headers the program adds.
const MAX_OUTPUT: usize = 9216;

impl ProgramHarness {
    pub fn load(bpffs: &Path, instance: &str) -> Result<Self, DataplaneError> {
        require_root()?;
        let pin_dir = prepare_pin_dir(bpffs, instance)?;
        let loaded = load_lb_object(&pin_dir, HARNESS_MAP_SIZES).and_then(|mut ebpf| {
            xdp_program(&mut ebpf, program_names::LB)?;
            let known = services::KernelState::recover(&service_maps(&mut ebpf)?)?;
            Ok((ebpf, known))
        });
        match loaded {
            Ok((ebpf, known)) => Ok(ProgramHarness {
                ebpf,
                pin_dir,
                known,
            }),
            Err(error) => {
                // Nothing else owns the pins of a harness that failed to load.
                let _ = std::fs::remove_dir_all(&pin_dir);
                Err(error)
            }
        }
    }

    /// Writes services into the harness's maps, as [`super::Dataplane::apply`] does (but
    /// without touching the kernel's port reservations).
    pub fn apply(
        &mut self,
        settings: &LbSettings,
        wanted: &[ServiceSpec],
    ) -> Result<ApplyReport, DataplaneError> {
        let mut maps = service_maps(&mut self.ebpf)?;
        services::apply(&mut maps, &mut self.known, settings, wanted)
    }

    /// Runs the program once on `frame`, as if it arrived on no particular interface.
    pub fn run(&self, frame: &[u8]) -> Result<TestVerdict, DataplaneError> {
        self.run_repeated(frame, None, 1)
            .map(|(verdict, _)| verdict)
    }

    /// Runs the program on `frame` as if it arrived on interface `ingress_ifindex`, which must
    /// exist in the calling thread's network namespace; the FIB lookups happen there.
    pub fn run_from(
        &self,
        ingress_ifindex: u32,
        frame: &[u8],
    ) -> Result<TestVerdict, DataplaneError> {
        self.run_repeated(frame, Some(ingress_ifindex), 1)
            .map(|(verdict, _)| verdict)
    }

    /// Runs the program `repeat` times on `frame` in the kernel; returns the last verdict and
    /// the kernel's mean time per run.
    pub fn run_repeated(
        &self,
        frame: &[u8],
        ingress_ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<(TestVerdict, Duration), DataplaneError> {
        test_run(
            &self.ebpf,
            program_names::LB,
            frame,
            ingress_ifindex,
            repeat,
        )
    }

    pub fn proto_stats(&self) -> Result<ProtoStats, DataplaneError> {
        loaded_proto_stats(&self.ebpf)
    }
}

impl Drop for ProgramHarness {
    fn drop(&mut self) {
        // The maps stay alive while `ebpf` holds them; only the pins go.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// A program the XDP benchmark measures the load balancer against, run the same way. It has
/// no maps, so nothing is pinned.
pub struct ReferenceProgram {
    ebpf: Ebpf,
    name: &'static str,
}

impl ReferenceProgram {
    /// The empty `xdp_pass`: returns XDP_PASS and reads nothing (the test run's own cost).
    pub fn bare_pass() -> Result<Self, DataplaneError> {
        Self::load(XDP_PASS_OBJECT, program_names::PASS)
    }

    /// `xdp_parse_pass`: the load balancer's parser, then XDP_PASS.
    pub fn parse_pass() -> Result<Self, DataplaneError> {
        Self::load(XDP_PARSE_PASS_OBJECT, program_names::PARSE_PASS)
    }

    fn load(object: &[u8], name: &'static str) -> Result<Self, DataplaneError> {
        require_root()?;
        let mut ebpf = Ebpf::load(object).map_err(|source| DataplaneError::Load { source })?;
        xdp_program(&mut ebpf, name)?;
        Ok(ReferenceProgram { ebpf, name })
    }

    /// As [`ProgramHarness::run_repeated`].
    pub fn run_repeated(
        &self,
        frame: &[u8],
        ingress_ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<(TestVerdict, Duration), DataplaneError> {
        test_run(&self.ebpf, self.name, frame, ingress_ifindex, repeat)
    }
}

/// One BPF_PROG_TEST_RUN of the loaded XDP program `name` of `ebpf`: `repeat` runs on `frame`,
/// from interface `ingress_ifindex` if given; the last verdict and the kernel's mean time per
/// run.
fn test_run(
    ebpf: &Ebpf,
    name: &'static str,
    frame: &[u8],
    ingress_ifindex: Option<u32>,
    repeat: u32,
) -> Result<(TestVerdict, Duration), DataplaneError> {
    let program: &Xdp = ebpf
        .program(name)
        .ok_or(DataplaneError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })?;
    let mut output = vec![0; frame.len().max(MAX_OUTPUT)];
    let ctx = ingress_ifindex.map(|ifindex| xdp_md_bytes(ifindex, frame.len()));
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ctx_in: ctx.as_ref().map(|ctx| ctx.as_slice()),
            repeat,
            ..Default::default()
        })
        .map_err(|source| DataplaneError::Program { name, source })?;
    output.truncate(result.data_size_out as usize);
    let verdict = TestVerdict {
        action: XdpAction::from(result.return_value),
        output,
    };
    Ok((verdict, result.duration))
}

/// A `struct xdp_md` (data, data_end, data_meta, ingress_ifindex, rx_queue_index,
/// egress_ifindex) naming the ingress interface. `data_end` is the frame's length: since Linux
/// 6.18 the kernel reads it as the size of the frame's linear part (a 0 there would give the
/// program an empty frame), and older kernels reject any other value.
fn xdp_md_bytes(ingress_ifindex: u32, frame_len: usize) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    let data_end = u32::try_from(frame_len).unwrap_or(u32::MAX);
    ctx[4..8].copy_from_slice(&data_end.to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}
