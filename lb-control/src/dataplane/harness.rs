//! Runs the XDP program on frames through BPF_PROG_TEST_RUN, attached nowhere: the packet
//! fixtures (the program's specification) and the benchmarks drive it through this.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::program_names;

use super::{
    ApplyReport, DataplaneError, LbSettings, MapSizes, ProtoStats, ServiceSpec, load_lb_object,
    loaded_proto_stats, prepare_pin_dir, require_root, service_maps, services, xdp_program,
};

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

/// Loads the load balancer object once more onto the maps a harness pinned in `pin_dir`, as
/// the harness loaded it: for callers that run the program through test runs of their own.
pub fn load_onto_harness_maps(pin_dir: &Path) -> Result<Ebpf, DataplaneError> {
    load_lb_object(pin_dir, HARNESS_MAP_SIZES)
}

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
    ) -> Result<(TestVerdict, std::time::Duration), DataplaneError> {
        let mut output = vec![0; frame.len().max(MAX_OUTPUT)];
        let ctx = ingress_ifindex.map(|ifindex| xdp_md_bytes(ifindex, frame.len()));
        let result = self.program()?.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ctx_in: ctx.as_ref().map(|ctx| ctx.as_slice()),
            repeat,
            ..Default::default()
        });
        let result = result.map_err(|source| DataplaneError::Program {
            name: program_names::LB,
            source,
        })?;
        output.truncate(result.data_size_out as usize);
        let verdict = TestVerdict {
            action: XdpAction::from(result.return_value),
            output,
        };
        Ok((verdict, result.duration))
    }

    pub fn proto_stats(&self) -> Result<ProtoStats, DataplaneError> {
        loaded_proto_stats(&self.ebpf)
    }

    fn program(&self) -> Result<&Xdp, DataplaneError> {
        let name = program_names::LB;
        self.ebpf
            .program(name)
            .ok_or(DataplaneError::MissingProgram { name })?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }
}

/// A `struct xdp_md` naming the ingress interface. `data_end` is the frame's length: the
/// kernel reads it as the size of the frame's linear part (and rejects other values on older
/// kernels).
fn xdp_md_bytes(ingress_ifindex: u32, frame_len: usize) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    let data_end = u32::try_from(frame_len).unwrap_or(u32::MAX);
    ctx[4..8].copy_from_slice(&data_end.to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}

impl Drop for ProgramHarness {
    fn drop(&mut self) {
        // The maps stay alive while `ebpf` holds them; only the pins go.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
