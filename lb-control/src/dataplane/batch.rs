//! Reads and deletes of many hash-map entries per system call (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_DELETE_BATCH`), which aya 0.14 does not offer: its iterator makes two system calls
//! per entry (next key, then lookup), so a walk of a full flow table (262,144 flows) cost about
//! half a million of them, on every backend that went down.

use std::{
    borrow::Borrow,
    io, mem,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries read per system call at first; grown when one hash bucket holds more.
const BATCH: usize = 4096;

/// Room for the kernel's position token between calls: a bucket index (`u32`) for hash maps.
type Position = [u8; 8];

/// Calls `visit` with each entry of `map`. Like any walk of a live map, it may or may not see
/// entries inserted or deleted meanwhile.
pub fn for_each<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &HashMap<T, K, V>,
    mut visit: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut capacity = BATCH;
    let mut keys: Vec<K> = Vec::with_capacity(capacity);
    let mut values: Vec<V> = Vec::with_capacity(capacity);
    let mut position: Option<Position> = None;
    loop {
        let mut next: Position = [0; 8];
        let mut attr = batch_attr(map);
        // SAFETY: `batch` is the union member these commands read; every pointer outlives the
        // call, and the buffers have room for `count` keys and values.
        let read = unsafe {
            let batch = &mut attr.batch;
            batch.in_batch = position.as_ref().map_or(0, |at| at.as_ptr() as u64);
            batch.out_batch = next.as_mut_ptr() as u64;
            batch.keys = keys.as_mut_ptr() as u64;
            batch.values = values.as_mut_ptr() as u64;
            batch.count = capacity as u32;
            let result = sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
            let read = (attr.batch.count as usize).min(capacity);
            // The kernel wrote `read` whole keys and values (plain data) before returning.
            keys.set_len(read);
            values.set_len(read);
            result.map(|()| read)
        };
        for (key, value) in keys.iter().zip(&values) {
            visit(key, value);
        }
        keys.clear();
        values.clear();
        match read {
            Ok(_) => position = Some(next),
            // The last call: what it read was visited above.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            // One bucket holds more entries than fit: ask again from the same place.
            Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => {
                capacity *= 2;
                keys.reserve(capacity);
                values.reserve(capacity);
            }
            Err(error) => return Err(error),
        }
    }
}

/// Deletes `keys` from `map`, skipping those already gone (an LRU map may evict an entry at any
/// time). Returns how many it deleted.
pub fn delete<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &mut HashMap<T, K, V>,
    keys: &[K],
) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = batch_attr(map);
        // SAFETY: as in `for_each`; the kernel only reads `count` keys.
        let (result, done) = unsafe {
            attr.batch.keys = rest.as_ptr() as u64;
            attr.batch.count = rest.len() as u32;
            let result = sys_bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr);
            (result, (attr.batch.count as usize).min(rest.len()))
        };
        deleted += done;
        match result {
            Ok(()) => break,
            // The key at `done` was gone: go on after it.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(error) => return Err(error),
        }
    }
    Ok(deleted)
}

fn batch_attr<T: Borrow<MapData>, K: Pod, V: Pod>(map: &HashMap<T, K, V>) -> bpf_attr {
    // SAFETY: an all-zero bpf_attr is a valid request with no options.
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    attr.batch.map_fd = map.map().fd().as_fd().as_raw_fd() as u32;
    attr
}

/// # Safety
/// `attr` must be a valid request for `cmd`: every pointer in it valid for what `cmd` does.
unsafe fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: the caller vouches for `attr`; the size passed is its own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
