//! The table of intercepted symbols, their versions, and the `cuGetProcAddress` selection rule
//! (pure). Also compiled into the `gantry-vcuda-symcheck` binary.

/// Which real library a symbol comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lib {
    Cuda,
    Nvml,
}

/// What the interceptor does with a symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Checks the configuration; denies the GPU when it is invalid.
    Init,
    /// Hands back intercepting functions.
    Entry,
    /// Charges the container's memory account before allocating.
    Alloc,
    /// Pre-3.2 32-bit allocation ABI: refused while a memory cap applies.
    LegacyAlloc,
    /// Gives memory back to the account.
    Free,
    /// Reports the cap and the container's usage.
    MemInfo,
    /// Throttled to the compute share.
    Launch,
}

/// One intercepted, exported symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sym {
    pub id: Id,
    pub name: &'static str,
    /// Name without version or per-thread suffix (what `cuGetProcAddress` is asked for).
    pub base: &'static str,
    /// CUDA version (1000 * major + 10 * minor) that introduced this ABI; 0 for NVML.
    pub since: u32,
    /// Per-thread default stream variant (`_ptsz`).
    pub per_thread: bool,
    pub role: Role,
    pub lib: Lib,
}

macro_rules! table {
    ($( $name:ident = $base:literal, $since:literal, $pt:literal, $role:ident, $lib:ident; )*) => {
        /// Every intercepted symbol, in table order.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(usize)]
        pub enum Id { $($name),* }

        /// The table, indexed by `Id as usize`.
        pub static SYMBOLS: &[Sym] = &[$(Sym {
            id: Id::$name,
            name: stringify!($name),
            base: $base,
            since: $since,
            per_thread: $pt,
            role: Role::$role,
            lib: Lib::$lib,
        }),*];
    };
}

table! {
    cuInit = "cuInit", 2000, false, Init, Cuda;
    cuGetProcAddress = "cuGetProcAddress", 11030, false, Entry, Cuda;
    cuGetProcAddress_v2 = "cuGetProcAddress", 12000, false, Entry, Cuda;
    cuMemAlloc = "cuMemAlloc", 2000, false, LegacyAlloc, Cuda;
    cuMemAlloc_v2 = "cuMemAlloc", 3020, false, Alloc, Cuda;
    cuMemAllocPitch = "cuMemAllocPitch", 2000, false, LegacyAlloc, Cuda;
    cuMemAllocPitch_v2 = "cuMemAllocPitch", 3020, false, Alloc, Cuda;
    cuMemAllocManaged = "cuMemAllocManaged", 6000, false, Alloc, Cuda;
    cuMemAllocAsync = "cuMemAllocAsync", 11020, false, Alloc, Cuda;
    cuMemAllocAsync_ptsz = "cuMemAllocAsync", 11020, true, Alloc, Cuda;
    cuMemAllocFromPoolAsync = "cuMemAllocFromPoolAsync", 11020, false, Alloc, Cuda;
    cuMemAllocFromPoolAsync_ptsz = "cuMemAllocFromPoolAsync", 11020, true, Alloc, Cuda;
    cuMemCreate = "cuMemCreate", 10020, false, Alloc, Cuda;
    cuArrayCreate = "cuArrayCreate", 2000, false, LegacyAlloc, Cuda;
    cuArrayCreate_v2 = "cuArrayCreate", 3020, false, Alloc, Cuda;
    cuArray3DCreate = "cuArray3DCreate", 2000, false, LegacyAlloc, Cuda;
    cuArray3DCreate_v2 = "cuArray3DCreate", 3020, false, Alloc, Cuda;
    cuMipmappedArrayCreate = "cuMipmappedArrayCreate", 5000, false, Alloc, Cuda;
    cuMemFree_v2 = "cuMemFree", 3020, false, Free, Cuda;
    cuMemFreeAsync = "cuMemFreeAsync", 11020, false, Free, Cuda;
    cuMemFreeAsync_ptsz = "cuMemFreeAsync", 11020, true, Free, Cuda;
    cuMemRelease = "cuMemRelease", 10020, false, Free, Cuda;
    cuArrayDestroy = "cuArrayDestroy", 2000, false, Free, Cuda;
    cuMipmappedArrayDestroy = "cuMipmappedArrayDestroy", 5000, false, Free, Cuda;
    cuMemGetInfo = "cuMemGetInfo", 2000, false, MemInfo, Cuda;
    cuMemGetInfo_v2 = "cuMemGetInfo", 3020, false, MemInfo, Cuda;
    cuDeviceTotalMem = "cuDeviceTotalMem", 2000, false, MemInfo, Cuda;
    cuDeviceTotalMem_v2 = "cuDeviceTotalMem", 3020, false, MemInfo, Cuda;
    cuLaunchKernel = "cuLaunchKernel", 4000, false, Launch, Cuda;
    cuLaunchKernel_ptsz = "cuLaunchKernel", 7000, true, Launch, Cuda;
    cuLaunchKernelEx = "cuLaunchKernelEx", 11060, false, Launch, Cuda;
    cuLaunchKernelEx_ptsz = "cuLaunchKernelEx", 11060, true, Launch, Cuda;
    cuLaunchCooperativeKernel = "cuLaunchCooperativeKernel", 9000, false, Launch, Cuda;
    cuLaunchCooperativeKernel_ptsz = "cuLaunchCooperativeKernel", 9000, true, Launch, Cuda;
    cuGraphLaunch = "cuGraphLaunch", 10000, false, Launch, Cuda;
    cuGraphLaunch_ptsz = "cuGraphLaunch", 10000, true, Launch, Cuda;
    cuLaunch = "cuLaunch", 2000, false, Launch, Cuda;
    cuLaunchGrid = "cuLaunchGrid", 2000, false, Launch, Cuda;
    cuLaunchGridAsync = "cuLaunchGridAsync", 2000, false, Launch, Cuda;
    nvmlDeviceGetMemoryInfo = "nvmlDeviceGetMemoryInfo", 0, false, MemInfo, Nvml;
    nvmlDeviceGetMemoryInfo_v2 = "nvmlDeviceGetMemoryInfo", 0, false, MemInfo, Nvml;
}

/// Variants of intercepted families that the driver exports and that are deliberately passed
/// through, with the reason.
pub static NOT_INTERCEPTED: &[(&str, &str)] = &[(
    "cuMemFree",
    "pre-3.2 32-bit ABI; nothing to give back since its allocations are refused under a cap",
)];

/// The table entry of an `Id`.
pub fn sym(id: Id) -> &'static Sym {
    &SYMBOLS[id as usize]
}

/// Looks a symbol up by its exported name.
pub fn by_name(name: &[u8]) -> Option<Id> {
    if !(name.starts_with(b"cu") || name.starts_with(b"nvml")) {
        return None;
    }
    SYMBOLS
        .iter()
        .find(|s| s.name.as_bytes() == name)
        .map(|s| s.id)
}

/// True if `base` names an intercepted family of the driver API.
pub fn is_intercepted_base(base: &str) -> bool {
    SYMBOLS.iter().any(|s| s.base == base && s.lib == Lib::Cuda)
}

/// The variant `cuGetProcAddress(base, cudaVersion, flags)` designates: the newest ABI not
/// newer than `cuda_version`, the `_ptsz` one when the per-thread default stream is asked for
/// and the family has one.
pub fn select(base: &[u8], cuda_version: u32, per_thread: bool) -> Option<Id> {
    let family = || {
        SYMBOLS
            .iter()
            .filter(move |s| s.lib == Lib::Cuda && s.base.as_bytes() == base)
    };
    let has_pt = family().any(|s| s.per_thread);
    family()
        .filter(|s| s.per_thread == (per_thread && has_pt) && s.since <= cuda_version)
        .max_by_key(|s| s.since)
        .map(|s| s.id)
}

/// The family name of an exported driver symbol: without `_ptsz`/`_ptds` and `_vN` suffixes.
pub fn base_of(name: &str) -> &str {
    let n = name
        .strip_suffix("_ptsz")
        .or_else(|| name.strip_suffix("_ptds"))
        .unwrap_or(name);
    match n.rfind("_v") {
        Some(i) if n.len() > i + 2 && n[i + 2..].bytes().all(|b| b.is_ascii_digit()) => &n[..i],
        _ => n,
    }
}

/// Driver exports that belong to an intercepted family but are neither intercepted nor listed
/// as deliberately passed through: every name returned is a hole in the enforcement.
pub fn missing_variants<'a>(exports: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = exports
        .into_iter()
        .filter(|n| is_intercepted_base(base_of(n)))
        .filter(|n| !SYMBOLS.iter().any(|s| s.name == *n))
        .filter(|n| !NOT_INTERCEPTED.iter().any(|(x, _)| x == n))
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_indexed_by_id_and_names_are_unique() {
        for (i, s) in SYMBOLS.iter().enumerate() {
            assert_eq!(s.id as usize, i, "{}", s.name);
            assert_eq!(by_name(s.name.as_bytes()), Some(s.id));
            assert_eq!(base_of(s.name), s.base, "{}", s.name);
            assert_eq!(s.per_thread, s.name.ends_with("_ptsz"));
        }
        assert_eq!(by_name(b"cuCtxCreate_v2"), None);
        assert_eq!(by_name(b"malloc"), None);
    }

    #[test]
    fn every_family_has_a_variant_for_every_modern_version() {
        // No intercepted family may lose its interceptor for a newer CUDA: for 11.3 .. 13.x
        // the selected variant, when the family exists, is the newest one in the table.
        for v in [11030u32, 11080, 12000, 12080, 13000, 13020] {
            for s in SYMBOLS
                .iter()
                .filter(|s| s.lib == Lib::Cuda && s.since <= v)
            {
                let got = select(s.base.as_bytes(), v, s.per_thread).expect(s.name);
                let newest = SYMBOLS
                    .iter()
                    .filter(|x| x.base == s.base && x.per_thread == s.per_thread && x.since <= v)
                    .map(|x| x.since)
                    .max();
                assert_eq!(Some(sym(got).since), newest, "{} at {v}", s.name);
            }
        }
    }

    #[test]
    fn selection_follows_versions_and_per_thread_flag() {
        assert_eq!(select(b"cuMemAlloc", 3010, false), Some(Id::cuMemAlloc));
        assert_eq!(select(b"cuMemAlloc", 3020, false), Some(Id::cuMemAlloc_v2));
        assert_eq!(select(b"cuMemAlloc", 12000, true), Some(Id::cuMemAlloc_v2));
        assert_eq!(
            select(b"cuLaunchKernel", 12000, false),
            Some(Id::cuLaunchKernel)
        );
        assert_eq!(
            select(b"cuLaunchKernel", 12000, true),
            Some(Id::cuLaunchKernel_ptsz)
        );
        assert_eq!(select(b"cuLaunchKernel", 3000, false), None);
        assert_eq!(
            select(b"cuGetProcAddress", 11030, false),
            Some(Id::cuGetProcAddress)
        );
        assert_eq!(
            select(b"cuGetProcAddress", 12000, false),
            Some(Id::cuGetProcAddress_v2)
        );
        assert_eq!(
            select(b"cuGraphLaunch", 12000, true),
            Some(Id::cuGraphLaunch_ptsz)
        );
        assert_eq!(select(b"cuMemAllocAsync", 11010, false), None);
        assert_eq!(select(b"nvmlDeviceGetMemoryInfo", 12000, false), None);
        assert_eq!(select(b"cuCtxCreate", 12000, false), None);
    }

    #[test]
    fn base_names() {
        assert_eq!(base_of("cuMemAllocAsync_ptsz"), "cuMemAllocAsync");
        assert_eq!(base_of("cuMemcpy_v2_ptds"), "cuMemcpy");
        assert_eq!(base_of("cuGetProcAddress_v2"), "cuGetProcAddress");
        assert_eq!(base_of("cuMemAlloc_v12"), "cuMemAlloc");
        assert_eq!(base_of("cuMemAlloc_vx"), "cuMemAlloc_vx");
        assert_eq!(base_of("cu_v"), "cu_v");
    }

    #[test]
    fn missing_variant_check_fails_on_a_new_version() {
        let mut exports: Vec<&str> = SYMBOLS.iter().map(|s| s.name).collect();
        exports.extend(["cuMemFree", "cuCtxCreate_v4", "cuMemcpy_ptds"]);
        assert!(missing_variants(exports.iter().copied()).is_empty());
        exports.extend([
            "cuMemAlloc_v3",
            "cuLaunchKernelEx_v2_ptsz",
            "cuMemCreate_v2",
        ]);
        assert_eq!(
            missing_variants(exports.iter().copied()),
            [
                "cuLaunchKernelEx_v2_ptsz",
                "cuMemAlloc_v3",
                "cuMemCreate_v2"
            ]
        );
    }
}
