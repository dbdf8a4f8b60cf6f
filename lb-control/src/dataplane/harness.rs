//! Runs the XDP program on frames through BPF_PROG_TEST_RUN, attached nowhere: the packet
//! fixtures (the program's specification) and the benchmarks drive it through this.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::program_names;

use super::{
    DataplaneError, MapSizes, ProtoStats, bpffs, load_lb_object, loaded_proto_stats, pin_dir,
    require_root, xdp_program,
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
}

/// Room for the largest frame a test sends plus any headers the program adds.
const MAX_OUTPUT: usize = 9216;

impl ProgramHarness {
    pub fn load(bpffs: &Path, instance: &str) -> Result<Self, DataplaneError> {
        require_root()?;
        bpffs::ensure_mounted(bpffs)?;
        let pin_dir = pin_dir(bpffs, instance);
        std::fs::create_dir_all(&pin_dir).map_err(|source| DataplaneError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let mut ebpf = load_lb_object(
            &pin_dir,
            MapSizes {
                maglev_table_size: lb_common::maglev::DEFAULT_TABLE_SIZE,
                max_flows: lb_common::maps::DEFAULT_MAX_FLOWS,
            },
        )?;
        xdp_program(&mut ebpf, program_names::LB)?;
        Ok(ProgramHarness { ebpf, pin_dir })
    }

    /// Runs the program once on `frame`.
    pub fn run(&self, frame: &[u8]) -> Result<TestVerdict, DataplaneError> {
        let mut output = vec![0; frame.len().max(MAX_OUTPUT)];
        let result = self.program()?.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ..Default::default()
        });
        let result = result.map_err(|source| DataplaneError::Program {
            name: program_names::LB,
            source,
        })?;
        output.truncate(result.data_size_out as usize);
        Ok(TestVerdict {
            action: XdpAction::from(result.return_value),
            output,
        })
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

impl Drop for ProgramHarness {
    fn drop(&mut self) {
        // The maps stay alive while `ebpf` holds them; only the pins go.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
