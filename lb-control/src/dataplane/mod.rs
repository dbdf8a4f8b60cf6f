//! The kernel data plane: loads the XDP program, attaches it to interfaces, pins its maps, and
//! reads them. This is the only module that touches aya; the rest of lb-control talks to it
//! through [`Dataplane`].

mod batch;
mod blocklist;
mod bpffs;
mod error;
mod flow_table;
#[cfg(feature = "test-harness")]
mod harness;
mod second_chance;
mod services;
mod settings;
mod stats;
mod sysctl;

use std::{
    collections::BTreeMap,
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, MapError, PerCpuArray},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    map_names,
    maps::{FLOW_CACHE_SLOTS_PER_CPU, MAX_SERVICES},
    program_names,
    stats::{Counters, ProtoSlot},
};
use tracing::{info, warn};

pub use self::{
    blocklist::{
        BlockEntry, Blocklist, BlocklistChanges, BlocklistHandle, latest_block_expiry,
        round_up_to_second,
    },
    bpffs::{BpffsError, BpffsState, ensure_mounted as ensure_bpffs_mounted},
    error::DataplaneError,
    flow_table::{FlowTable, InstallReport, PortableFlow},
    second_chance::{SecondChanceMap, SecondChanceMode, read_second_chance_packets},
    services::{
        ApplyReport, BackendSpec, LbSettings, ProblemSubject, ServiceSpec, SpecProblem,
        validate as validate_services,
    },
    settings::{DataplaneSection, FragmentPolicy},
    stats::{BackendCounters, ServiceCounters, Stats, open_flows_to, read_pinned_stats},
};
// BPF_PROG_TEST_RUN for the packet fixtures and the XDP benchmark: test-only.
#[cfg(feature = "test-harness")]
pub use self::harness::{ProgramHarness, ReferenceProgram, TestVerdict, XdpAction};

/// The compiled load balancer object, embedded at build time by `build.rs`.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
/// A bare XDP_PASS program with no maps, embedded the same way.
pub static XDP_PASS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-pass"));

/// Default mount point of the BPF filesystem.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// How to attach the XDP program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode with a warning where the driver
    /// has no native XDP.
    #[default]
    Auto,
    /// Native (driver) mode only; fail where the driver lacks it.
    Native,
    /// Generic (SKB) mode: works on every device, slower.
    Generic,
}

/// The mode an interface actually got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        })
    }
}

/// What the data plane needs to start.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// Names the pin directory `<bpffs>/<instance>/`, so several load balancers can share a host.
    pub instance: String,
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    /// Mount point of the BPF filesystem.
    pub bpffs: PathBuf,
    /// Entries of each Maglev table (a prime from `lb_common::maglev::TABLE_SIZES`).
    pub maglev_table_size: u32,
    /// Connection-tracking capacity.
    pub max_flows: u32,
}

/// Map sizes chosen at load time.
#[derive(Debug, Clone, Copy)]
struct MapSizes {
    maglev_table_size: u32,
    max_flows: u32,
}

/// The loaded XDP program, attached to its interfaces through links pinned as
/// `<pin_dir>/link-<interface>`. The pins keep the program attached if lb-control dies, and a
/// restarted lb-control swaps its program into those links atomically. [`Dataplane::detach`]
/// (a clean shutdown) removes them; the pinned maps stay, so flows and counters survive.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attached: Vec<Attachment>,
    known: services::KernelState,
}

/// One interface the program is attached to.
pub struct Attachment {
    pub interface: String,
    pub mode: AttachedMode,
    /// The program replaced a running one (lb-control restarted) instead of attaching anew.
    pub reattached: bool,
    link: PinnedLink,
}

impl Dataplane {
    /// Checks privileges and interfaces, mounts the BPF filesystem if needed, loads the XDP
    /// program (reusing maps pinned by an earlier run) and attaches it to every interface.
    pub fn start(config: &DataplaneConfig) -> Result<Self, DataplaneError> {
        require_root()?;
        if config.interfaces.is_empty() {
            return Err(DataplaneError::NoInterfaces);
        }
        let if_indexes = config
            .interfaces
            .iter()
            .map(|name| interface_index(name).map(|index| (name.as_str(), index)))
            .collect::<Result<Vec<_>, _>>()?;
        let pin_dir = prepare_pin_dir(&config.bpffs, &config.instance)?;

        let mut ebpf = load_lb_object(
            &pin_dir,
            MapSizes {
                maglev_table_size: config.maglev_table_size,
                max_flows: config.max_flows,
            },
        )?;
        start_kernel_logger(&mut ebpf);
        let known = services::KernelState::recover(&service_maps(&mut ebpf)?)?;

        let program = xdp_program(&mut ebpf, program_names::LB)?;
        let mut attached = Vec::with_capacity(if_indexes.len());
        for (name, index) in if_indexes {
            let attachment = attach_pinned(program, name, index, config.mode, &pin_dir)?;
            if attachment.reattached {
                info!(
                    interface = name,
                    "replaced the running XDP program; its flows carry on"
                );
            } else {
                info!(interface = name, mode = %attachment.mode, "attached the XDP program");
            }
            attached.push(attachment);
        }
        Ok(Dataplane {
            ebpf,
            pin_dir,
            attached,
            known,
        })
    }

    /// Makes the kernel serve exactly `services` with `settings`: reserves the NAT ports from
    /// the kernel's own use, writes backends and Maglev tables (each flipped live atomically),
    /// removes what is no longer wanted and purges the flows of backends that went down.
    pub fn apply(
        &mut self,
        settings: &LbSettings,
        wanted: &[ServiceSpec],
    ) -> Result<ApplyReport, DataplaneError> {
        sysctl::reserve_local_ports(&settings.nat_ports)?;
        let mut maps = service_maps(&mut self.ebpf)?;
        services::apply(&mut maps, &mut self.known, settings, wanted)
    }

    /// Reads back the ids of the services and backends in the kernel and forgets the tables
    /// this process wrote: another lb-control wrote them since (an upgrade).
    pub fn reread_kernel_state(&mut self) -> Result<(), DataplaneError> {
        self.known = services::KernelState::recover(&service_maps(&mut self.ebpf)?)?;
        Ok(())
    }

    /// Interfaces the program is attached to.
    pub fn attached(&self) -> &[Attachment] {
        &self.attached
    }

    /// Detaches the program from every interface (a clean shutdown): the link pins go, and with
    /// them the attachments. Maps stay pinned.
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        for attachment in self.attached.drain(..) {
            let path = link_pin_path(&self.pin_dir, &attachment.interface);
            attachment
                .link
                .unpin()
                .map_err(|source| DataplaneError::PinDir { path, source })?;
        }
        Ok(())
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Per-protocol counters summed over all CPUs.
    pub fn proto_stats(&self) -> Result<ProtoStats, DataplaneError> {
        loaded_proto_stats(&self.ebpf)
    }
}

/// Loads the load balancer object, reusing (or creating) the maps pinned in `pin_dir`.
fn load_lb_object(pin_dir: &Path, sizes: MapSizes) -> Result<Ebpf, DataplaneError> {
    let log_level = kernel_log_level();
    let maglev_entries = MAX_SERVICES * 2 * sizes.maglev_table_size;
    let cpus =
        aya::util::nr_cpus().map_err(|(what, source)| DataplaneError::Cpus { what, source })?;
    let flow_cache_entries = u32::try_from(cpus)
        .unwrap_or(u32::MAX)
        .saturating_mul(FLOW_CACHE_SLOTS_PER_CPU);
    EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .override_global("AYA_LOG_LEVEL", &log_level, false)
        .map_max_entries(map_names::MAGLEV, maglev_entries)
        .map_max_entries(map_names::FLOWS, sizes.max_flows)
        .map_max_entries(map_names::NAT_REVERSE, sizes.max_flows.saturating_mul(2))
        .map_max_entries(map_names::FLOW_CACHE, flow_cache_entries)
        .load(XDP_OBJECT)
        .map_err(|source| DataplaneError::Load { source })
}

/// Borrows the maps that services are written to.
fn service_maps(ebpf: &mut Ebpf) -> Result<services::Maps<'_>, DataplaneError> {
    let [
        config,
        services,
        services_by_id,
        vips,
        backends,
        maglev,
        flows,
        flow_cache_epoch,
    ] = ebpf.maps_disjoint_mut([
        map_names::CONFIG,
        map_names::SERVICES,
        map_names::SERVICES_BY_ID,
        map_names::VIPS,
        map_names::BACKENDS,
        map_names::MAGLEV,
        map_names::FLOWS,
        map_names::FLOW_CACHE_EPOCH,
    ]);
    fn typed<'a, T: TryFrom<&'a mut Map, Error = aya::maps::MapError>>(
        map: Option<&'a mut Map>,
        name: &'static str,
    ) -> Result<T, DataplaneError> {
        let map = map.ok_or(DataplaneError::MissingMap { name })?;
        T::try_from(map).map_err(map_error(name))
    }
    Ok(services::Maps {
        config: typed(config, map_names::CONFIG)?,
        services: typed(services, map_names::SERVICES)?,
        services_by_id: typed(services_by_id, map_names::SERVICES_BY_ID)?,
        vips: typed(vips, map_names::VIPS)?,
        backends: typed(backends, map_names::BACKENDS)?,
        maglev: typed(maglev, map_names::MAGLEV)?,
        flows: typed(flows, map_names::FLOWS)?,
        flow_cache_epoch: typed(flow_cache_epoch, map_names::FLOW_CACHE_EPOCH)?,
    })
}

fn loaded_proto_stats(ebpf: &Ebpf) -> Result<ProtoStats, DataplaneError> {
    let map = ebpf
        .map(map_names::PROTO_STATS)
        .ok_or(DataplaneError::MissingMap {
            name: map_names::PROTO_STATS,
        })?;
    let array =
        PerCpuArray::<_, Counters>::try_from(map).map_err(map_error(map_names::PROTO_STATS))?;
    sum_proto_stats(&array)
}

/// Where the link attaching the program to `interface` is pinned. Its presence means the
/// program is attached there: the readiness signal for whoever started lb-control.
pub fn link_pin_path(pin_dir: &Path, interface: &str) -> PathBuf {
    pin_dir.join(format!("link-{interface}"))
}

/// Attaches `program` to an interface through a pinned link: into the existing link when an
/// earlier lb-control left one (an atomic program swap, so no packet misses the program), else
/// through a new one.
fn attach_pinned(
    program: &mut Xdp,
    interface: &str,
    index: u32,
    mode: AttachMode,
    pin_dir: &Path,
) -> Result<Attachment, DataplaneError> {
    let path = link_pin_path(pin_dir, interface);
    let pin_error = |reason| DataplaneError::LinkPin {
        path: path.clone(),
        reason,
    };
    if path.exists() {
        let handle = PinnedLink::from_pin(&path).map_err(|error| pin_error(error.to_string()))?;
        let link = PinnedLink::from_pin(&path).map_err(|error| pin_error(error.to_string()))?;
        let link =
            XdpLink::try_from(FdLink::from(link)).map_err(|error| pin_error(error.to_string()))?;
        program
            .attach_to_link(link)
            .map_err(|source| DataplaneError::Program {
                name: program_names::LB,
                source,
            })?;
        return Ok(Attachment {
            interface: interface.to_owned(),
            mode: AttachedMode::Native,
            reattached: true,
            link: handle,
        });
    }
    let (mode, link_id) = attach(program, interface, index, mode)?;
    let link = program
        .take_link(link_id)
        .map_err(|source| DataplaneError::Program {
            name: program_names::LB,
            source,
        })?;
    let link = FdLink::try_from(link)
        .map_err(|error| pin_error(error.to_string()))?
        .pin(&path)
        .map_err(|error| pin_error(error.to_string()))?;
    Ok(Attachment {
        interface: interface.to_owned(),
        mode,
        reattached: false,
        link,
    })
}

/// The directory a load balancer instance pins its maps in.
pub fn pin_dir(bpffs: &Path, instance: &str) -> PathBuf {
    bpffs.join(instance)
}

/// Mounts the BPF filesystem if needed and creates the instance's pin directory, its maps
/// pinned under an older name renamed.
fn prepare_pin_dir(bpffs: &Path, instance: &str) -> Result<PathBuf, DataplaneError> {
    if bpffs::ensure_mounted(bpffs)? == BpffsState::MountedNow {
        info!(path = %bpffs.display(), "mounted a BPF filesystem");
    }
    let pin_dir = pin_dir(bpffs, instance);
    std::fs::create_dir_all(&pin_dir).map_err(|source| DataplaneError::PinDir {
        path: pin_dir.clone(),
        source,
    })?;
    rename_old_pins(&pin_dir)?;
    Ok(pin_dir)
}

/// Maps whose pinned name changed: (old name, current name).
const RENAMED_PINS: &[(&str, &str)] = &[("BLOCKLIST_ENTRIES", map_names::BLOCKLIST_VERSION)];

/// Gives maps an earlier lb-control pinned under an old name their current one, before the
/// program is loaded, so it takes them over with their contents as it does every pinned map.
/// (A new, empty `BLOCKLIST_VERSION` beside a full blocklist would read 0, and the program
/// would skip the blocklist until its next change.)
fn rename_old_pins(pin_dir: &Path) -> Result<(), DataplaneError> {
    for (old, current) in RENAMED_PINS {
        let (from, to) = (pin_dir.join(old), pin_dir.join(current));
        if !from.exists() {
            continue;
        }
        if to.exists() {
            warn!(
                old = %from.display(),
                current = %to.display(),
                "a map is pinned under its old name beside its current one; the program uses \
                 the current one, remove the old one"
            );
            continue;
        }
        std::fs::rename(&from, &to).map_err(|source| DataplaneError::RenamePin {
            from: from.clone(),
            to: to.clone(),
            source,
        })?;
        info!(from = %from.display(), to = %to.display(), "renamed a map pinned under its old name");
    }
    Ok(())
}

/// Opens the map `name` pinned in `pin_dir`, typed: how the CLI reads a running instance.
fn open_pinned<T: TryFrom<Map, Error = MapError>>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<T, DataplaneError> {
    let path = pin_dir.join(name);
    let data =
        MapData::from_pin(&path).map_err(|source| DataplaneError::OpenPinned { path, source })?;
    let map = Map::from_map_data(data).map_err(map_error(name))?;
    T::try_from(map).map_err(map_error(name))
}

/// Names the map in a map error.
fn map_error(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// Reads the per-protocol counters that a running (or earlier) instance pinned, without
/// loading anything: what `lb-control stats` shows.
pub fn read_pinned_proto_stats(pin_dir: &Path) -> Result<ProtoStats, DataplaneError> {
    let array: PerCpuArray<MapData, Counters> = open_pinned(pin_dir, map_names::PROTO_STATS)?;
    sum_proto_stats(&array)
}

/// Packets and bytes per protocol slot, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProtoStats {
    pub by_slot: BTreeMap<&'static str, Counters>,
}

impl ProtoStats {
    pub fn total(&self) -> Counters {
        let mut total = Counters::default();
        for counters in self.by_slot.values() {
            total.add(counters);
        }
        total
    }
}

fn sum_proto_stats<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, Counters>,
) -> Result<ProtoStats, DataplaneError> {
    let mut stats = ProtoStats::default();
    for slot in ProtoSlot::ALL {
        let per_cpu = array
            .get(&(slot as u32), 0)
            .map_err(map_error(map_names::PROTO_STATS))?;
        let mut sum = Counters::default();
        for counters in per_cpu.iter() {
            sum.add(counters);
        }
        stats.by_slot.insert(slot.name(), sum);
    }
    Ok(stats)
}

/// A bare XDP_PASS program attached to one interface for as long as the value lives.
///
/// The lab attaches it to veth peers: in native mode, `XDP_TX` on a veth and redirects into a
/// veth only deliver when the peer has an XDP program. Create it from a thread whose network
/// namespace holds the interface.
pub struct PassProgram {
    _ebpf: Ebpf,
}

impl PassProgram {
    pub fn attach(interface: &str) -> Result<Self, DataplaneError> {
        require_root()?;
        let index = interface_index(interface)?;
        let mut ebpf =
            Ebpf::load(XDP_PASS_OBJECT).map_err(|source| DataplaneError::Load { source })?;
        let program = xdp_program(&mut ebpf, program_names::PASS)?;
        attach(program, interface, index, AttachMode::Native)?;
        Ok(PassProgram { _ebpf: ebpf })
    }
}

pub fn require_root() -> Result<(), DataplaneError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DataplaneError::NotRoot);
    }
    Ok(())
}

fn interface_index(name: &str) -> Result<u32, DataplaneError> {
    let no_such = || DataplaneError::NoSuchInterface {
        name: name.to_owned(),
    };
    let c_name = CString::new(name).map_err(|_| no_such())?;
    // SAFETY: `c_name` is a valid C string.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(no_such()),
        index => Ok(index),
    }
}

/// Finds and loads (verifies) one of the object's XDP programs.
fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })?;
    program
        .load()
        .map_err(|source| DataplaneError::from_load_failure(name, source))?;
    Ok(program)
}

fn attach(
    program: &mut Xdp,
    interface: &str,
    index: u32,
    mode: AttachMode,
) -> Result<(AttachedMode, XdpLinkId), DataplaneError> {
    let attach_error = |mode, source| DataplaneError::Attach {
        interface: interface.to_owned(),
        mode,
        source,
    };
    match mode {
        AttachMode::Generic => program
            .attach_to_if_index(index, XdpMode::Skb)
            .map(|id| (AttachedMode::Generic, id))
            .map_err(|source| attach_error(AttachedMode::Generic, source)),
        AttachMode::Native => program
            .attach_to_if_index(index, XdpMode::Driver)
            .map(|id| (AttachedMode::Native, id))
            .map_err(|source| attach_error(AttachedMode::Native, source)),
        AttachMode::Auto => match program.attach_to_if_index(index, XdpMode::Driver) {
            Ok(id) => Ok((AttachedMode::Native, id)),
            Err(native_error) => {
                warn!(
                    interface,
                    error = %native_error,
                    "the driver has no native XDP; falling back to generic (SKB) mode, which is slower"
                );
                program
                    .attach_to_if_index(index, XdpMode::Skb)
                    .map(|id| (AttachedMode::Generic, id))
                    .map_err(|source| attach_error(AttachedMode::Generic, source))
            }
        },
    }
}

/// The kernel-side log level: kernel log statements below the userspace filter are compiled out
/// at load time rather than filtered after the fact.
fn kernel_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

/// Forwards the XDP program's aya-log records to our log output, from a background task.
fn start_kernel_logger(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => {
            warn!(%error, "kernel log lines from the XDP program will not be shown");
            return;
        }
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        warn!("no async runtime; kernel log lines from the XDP program will not be shown");
        return;
    };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd, which stays open and unchanged until
        // the AsyncFd (which owns the logger) is dropped.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut logger = match registered {
            Ok(logger) => logger,
            Err(error) => {
                warn!(%error, "kernel log lines from the XDP program will not be shown");
                return;
            }
        };
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A scratch directory of its own, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("lb-control-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("creating a scratch directory");
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn map_pinned_under_its_old_name_takes_its_current_name() {
        let dir = TempDir::new("old-pin");
        fs::write(dir.0.join("BLOCKLIST_ENTRIES"), "version 7").unwrap();
        rename_old_pins(&dir.0).unwrap();
        assert!(!dir.0.join("BLOCKLIST_ENTRIES").exists());
        assert_eq!(
            fs::read_to_string(dir.0.join(map_names::BLOCKLIST_VERSION)).unwrap(),
            "version 7",
            "the old pin should have been renamed, contents and all"
        );
    }

    #[test]
    fn map_pinned_under_its_current_name_is_kept_beside_an_old_one() {
        let dir = TempDir::new("both-pins");
        fs::write(dir.0.join("BLOCKLIST_ENTRIES"), "old").unwrap();
        fs::write(dir.0.join(map_names::BLOCKLIST_VERSION), "current").unwrap();
        rename_old_pins(&dir.0).unwrap();
        assert_eq!(
            fs::read_to_string(dir.0.join(map_names::BLOCKLIST_VERSION)).unwrap(),
            "current"
        );
        assert!(dir.0.join("BLOCKLIST_ENTRIES").exists());
    }
}
