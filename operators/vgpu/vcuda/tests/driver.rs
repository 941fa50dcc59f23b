//! End-to-end tests of the interception library without a GPU.
//!
//! The test builds a fake `libcuda.so.1` and `libnvidia-ml.so.1` and a small C client from
//! `tests/fake/`, then runs the client as separate processes with `LD_PRELOAD` naming the
//! freshly built `libgantry_vcuda.so`. The client reaches the driver the way runtimes do:
//! `dlopen` + `dlsym`, or `cuGetProcAddress_v2` obtained through `dlsym`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const UUID1: &str = "GPU-6a1f9c2e-0b1d-4c55-9e3a-2f7d8c9b0a11";

struct Env {
    lib: PathBuf,
    fake: PathBuf,
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the library (cargo does not build a cdylib for integration tests) and the fakes.
fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let exe = std::env::current_exe().expect("exe");
        let profile_dir = exe.parent().and_then(Path::parent).expect("profile dir");
        let lib = match std::env::var_os("GANTRY_VCUDA_TEST_LIB") {
            Some(p) => PathBuf::from(p),
            None => {
                let profile = profile_dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .expect("profile name");
                let target = profile_dir.parent().expect("target dir");
                let mut cmd = Command::new(env!("CARGO"));
                cmd.args(["build", "--quiet", "-p", "gantry-vcuda", "--lib"])
                    .arg("--target-dir")
                    .arg(target)
                    .current_dir(env!("CARGO_MANIFEST_DIR"));
                match profile {
                    "debug" => {}
                    "release" => {
                        cmd.arg("--release");
                    }
                    other => {
                        cmd.args(["--profile", other]);
                    }
                }
                sh(&mut cmd);
                profile_dir.join("libgantry_vcuda.so")
            }
        };
        assert!(lib.exists(), "{} missing", lib.display());
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake");
        let fake = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("vcuda-fake-{}", std::process::id()));
        std::fs::create_dir_all(&fake).expect("mkdir");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        sh(Command::new(&cc)
            .args([
                "-O1",
                "-shared",
                "-fPIC",
                "-Wl,-Bsymbolic",
                "-Wl,-soname,libcuda.so.1",
                "-o",
            ])
            .arg(fake.join("libcuda.so.1"))
            .arg(src.join("fake_cuda.c"))
            .args(["-ldl", "-lpthread"]));
        sh(Command::new(&cc)
            .args([
                "-O1",
                "-shared",
                "-fPIC",
                "-Wl,-soname,libnvidia-ml.so.1",
                "-o",
            ])
            .arg(fake.join("libnvidia-ml.so.1"))
            .arg(src.join("fake_nvml.c")));
        sh(Command::new(&cc)
            .args(["-O1", "-o"])
            .arg(fake.join("client"))
            .arg(src.join("client.c"))
            .args(["-ldl", "-lpthread"]));
        Env { lib, fake }
    })
}

/// A scratch directory with a config file and its account file.
struct Case {
    dir: PathBuf,
}

impl Case {
    fn new(name: &str, config: &str) -> Case {
        let dir = env().fake.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let account = dir.join("account");
        let text = config.replace("@ACCOUNT@", &account.to_string_lossy());
        std::fs::write(dir.join("config.json"), text).expect("write config");
        Case { dir }
    }

    /// One device entry for ordinal 0 with a memory cap.
    fn capped(name: &str, cap: u64) -> Case {
        Case::new(
            name,
            &format!(
                r#"{{"version":1,"accountFile":"@ACCOUNT@","devices":[{{"index":0,"memoryBytes":{cap}}}]}}"#
            ),
        )
    }

    fn command(&self, args: &[&str]) -> Command {
        let e = env();
        let mut c = Command::new(e.fake.join("client"));
        c.args(args)
            .env("LD_PRELOAD", &e.lib)
            .env("LD_LIBRARY_PATH", &e.fake)
            .env("GANTRY_VCUDA_CONFIG", self.dir.join("config.json"))
            .env_remove("GANTRY_VCUDA_DEBUG")
            .env_remove("GANTRY_VCUDA_REAL_LIBCUDA");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[])
    }

    fn run_with(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut c = self.command(args);
        c.envs(envs.iter().copied());
        let out = c.output().expect("run client");
        assert!(
            out.status.success(),
            "client {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts a client that ends with `hold`; returns once it printed `holding`.
    fn hold(&self, args: &[&str]) -> (Killer, Vec<String>) {
        let mut c = self.command(args);
        let mut k = Killer(vec![c.stdout(Stdio::piped()).spawn().expect("spawn")]);
        let out = k.0[0].stdout.take().expect("stdout");
        let mut lines = Vec::new();
        for line in BufReader::new(out).lines() {
            let line = line.expect("line");
            if line == "holding" {
                return (k, lines);
            }
            lines.push(line);
        }
        panic!("client ended before holding: {lines:?}");
    }
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills and reaps its processes when dropped, also when a test fails.
struct Killer(Vec<Child>);

impl Drop for Killer {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn kill(k: Killer) {
    drop(k);
}

#[test]
fn allocations_up_to_the_cap_succeed_and_the_next_fails_oom() {
    for mode in ["mode=gpa", "mode=dlsym"] {
        let case = Case::capped(&format!("cap-{mode}"), GIB);
        let q = (GIB / 4).to_string();
        let q_arg = format!("alloc={q}");
        let out = case.run(&[
            mode, "init", &q_arg, &q_arg, &q_arg, &q_arg, "alloc=1", "info", "freeall", "info",
            &q_arg,
        ]);
        assert_eq!(
            lines(&out),
            [
                "init 0".to_string(),
                "alloc 0".into(),
                "alloc 0".into(),
                "alloc 0".into(),
                "alloc 0".into(),
                "alloc 2".into(),
                format!("info 0 0 {GIB}"),
                "freeall 4 0".into(),
                format!("info 0 {GIB} {GIB}"),
                "alloc 0".into(),
            ],
            "{mode}"
        );
    }
}

#[test]
fn every_allocation_path_is_charged_and_released() {
    let cap = 64 * MIB;
    let case = Case::capped("paths", cap);
    // pitch: rows of 1000 bytes get a 1024-byte pitch; arrays are FLOAT x4 = 16 bytes
    let mip = (256 * 256 + 128 * 128 + 64 * 64) * 16;
    let used = 16 * MIB + 16 * MIB + 8 * MIB + 8 * MIB + 1024 * 1024 + 4 * MIB + 4 * MIB + mip;
    let room = cap - used;
    let out = case.run(&[
        &format!("managed={}", 16 * MIB),
        &format!("async={}", 16 * MIB),
        &format!("pool={}", 8 * MIB),
        &format!("create={},256", 8 * MIB),
        "pitch=1000,1024",
        "array=512,512",
        "array3d=64,64,64",
        "mipmap=256,256,3",
        "info",
        &format!("alloc={}", room + 1),
        &format!("async={}", room + 1),
        &format!("create={},256", room + 1),
        &format!("alloc={room}"),
        "info",
        "freeall",
        "info",
        // a cuMemCreate of host memory is not charged to the device
        &format!("create={},512", 2 * cap),
    ]);
    assert_eq!(
        lines(&out),
        [
            "managed 0".to_string(),
            "async 0".into(),
            "pool 0".into(),
            "create 0".into(),
            "pitch 0 1024".into(),
            "array 0".into(),
            "array3d 0".into(),
            "mipmap 0".into(),
            format!("info 0 {room} {cap}"),
            "alloc 2".into(),
            "async 2".into(),
            "create 2".into(),
            "alloc 0".into(),
            format!("info 0 0 {cap}"),
            "freeall 9 0".into(),
            format!("info 0 {cap} {cap}"),
            "create 0".into(),
        ]
    );
}

#[test]
fn the_account_is_shared_across_processes_and_freed_when_one_dies() {
    let case = Case::capped("shared", GIB);
    let (holder, got) = case.hold(&[&format!("alloc={}", 600 * MIB), "hold"]);
    assert_eq!(got, ["alloc 0"]);
    let out = case.run(&[
        &format!("alloc={}", 600 * MIB),
        &format!("alloc={}", 424 * MIB),
        "alloc=1",
        "info",
    ]);
    assert_eq!(
        lines(&out),
        [
            "alloc 2".to_string(),
            "alloc 0".into(),
            "alloc 2".into(),
            format!("info 0 0 {GIB}"),
        ]
    );
    // the holder dies (SIGKILL, no clean-up of its own): its 600 MiB come back
    kill(holder);
    let out = case.run(&["info", &format!("alloc={}", 1000 * MIB)]);
    assert_eq!(
        lines(&out),
        [format!("info 0 {GIB} {GIB}"), "alloc 0".to_string()]
    );
}

#[test]
fn concurrent_processes_and_threads_never_pass_the_cap() {
    let case = Case::capped("concurrent", 1000 * MIB);
    // 4 processes x 4 threads x 100 allocations of 1 MiB race for 1000 MiB; all hold on
    let arg = format!("threads=4,100,{MIB}");
    let mut held = Killer(Vec::new());
    let children: Vec<Child> = (0..4)
        .map(|_| {
            case.command(&[&arg, "hold"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut ok = 0;
    let mut oom = 0;
    // keep every pipe open: a client writing to a closed pipe would die of SIGPIPE, and the
    // library would rightly hand its memory to the others
    let mut readers = Vec::new();
    for mut child in children {
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        held.0.push(child);
        let mut line = String::new();
        reader.read_line(&mut line).expect("line");
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().expect("number"))
            .collect();
        assert_eq!(f.len(), 2, "{line}");
        ok += f[0];
        oom += f[1];
        let mut holding = String::new();
        reader.read_line(&mut holding).expect("line");
        assert_eq!(holding, "holding\n");
        readers.push(reader);
    }
    assert_eq!((ok, oom), (1000, 600));
    let out = case.run(&["info", "alloc=1"]);
    assert_eq!(
        lines(&out),
        [format!("info 0 0 {}", 1000 * MIB), "alloc 2".into()]
    );
    kill(held);
}

#[test]
fn get_proc_address_and_dlsym_hand_out_the_interceptors() {
    for (mode, pt) in [
        ("mode=gpa", "version=12080"),
        ("mode=gpa", "pt=1"),
        ("mode=dlsym", "pt=1"),
    ] {
        let case = Case::capped(&format!("procaddr-{mode}-{pt}"), GIB);
        let out = stdout(&case.run(&[mode, pt, "check"]));
        assert!(out.contains("check 25 27"), "{mode} {pt}: {out}");
        assert!(out.contains("real cuCtxSetCurrent") && out.contains("real cuEventRecord"));
    }
    // CUDA 11.x runtimes ask with an older version and get the interceptors too
    let case = Case::capped("procaddr-11", GIB);
    let out = stdout(&case.run(&["version=11080", "check"]));
    assert!(out.contains("hooked cuGetProcAddress_v2"), "{out}");
    assert!(out.contains("check 25 27"), "{out}");
}

#[test]
fn memory_queries_and_nvml_report_the_cap() {
    let case = Case::new(
        "nvml",
        &format!(
            r#"{{"version":1,"accountFile":"@ACCOUNT@","devices":[{{"uuid":"{UUID1}","memoryBytes":{}}}]}}"#,
            2 * GIB
        ),
    );
    // device 1 is capped (selected by UUID); device 0 is not
    let out = case.run(&[
        "dev=1",
        &format!("alloc={}", 512 * MIB),
        "info",
        "total=1",
        "total=0",
        "nvml=1",
        "nvml=0",
        "dev=0",
        &format!("alloc={}", 3 * GIB),
    ]);
    let free = 2 * GIB - 512 * MIB;
    assert_eq!(
        lines(&out),
        [
            "dev 0".to_string(),
            "alloc 0".into(),
            format!("info 0 {free} {}", 2 * GIB),
            format!("total 0 {}", 2 * GIB),
            format!("total 0 {}", 16 * GIB),
            format!("nvml 0 {} {} {free}", 2 * GIB, 512 * MIB),
            format!("nvml2 0 {} {} {free} 0", 2 * GIB, 512 * MIB),
            format!("nvml 0 {} {} {}", 16 * GIB, GIB, 15 * GIB),
            format!(
                "nvml2 0 {} {} {} {}",
                16 * GIB,
                GIB,
                15 * GIB - 512 * MIB,
                512 * MIB
            ),
            "dev 0".into(),
            "alloc 0".into(),
        ]
    );
}

#[test]
fn malformed_configuration_fails_closed_with_its_message() {
    for (config, reason) in [
        (r#"{"version":2}"#, "unsupported version 2"),
        (
            r#"{"version":1,"devices":[{"index":0,"memoryBytes":0}]}"#,
            "must be positive",
        ),
        ("not json", "not valid"),
    ] {
        let case = Case::new("malformed", config);
        let out = case.run(&["init", "alloc=1", "nvml=0"]);
        assert_eq!(
            lines(&out),
            ["init 800", "alloc 800", "nvml 4 0 0 0", "nvml2 4 0 0 0 0"],
            "{config}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("gantry-vcuda: invalid configuration"), "{err}");
        assert!(
            err.contains(reason) && err.contains("GPU access denied"),
            "{err}"
        );
        assert_eq!(
            err.matches("invalid configuration").count(),
            1,
            "said once: {err}"
        );
    }
    // a config path given explicitly but missing is invalid too
    let case = Case::capped("missing", GIB);
    let mut c = case.command(&["init"]);
    c.env("GANTRY_VCUDA_CONFIG", case.dir.join("nope.json"));
    let out = c.output().expect("run");
    assert_eq!(stdout(&out), "init 800\n");
}

#[test]
fn without_limits_the_library_passes_through() {
    let case = Case::new("noop", r#"{"version":1,"devices":[{"index":0}]}"#);
    let out = case.run(&["info", &format!("alloc={}", 15 * GIB), "legacy=5"]);
    assert_eq!(
        lines(&out),
        [
            format!("info 0 {} {}", 16 * GIB, 16 * GIB),
            "alloc 0".into(),
            "legacy 0".into()
        ]
    );
    let out = case.run_with(&["launch=100"], &[("FAKE_CUDA_KERNEL_US", "2000")]);
    let util: u32 = stdout(&out)
        .split_whitespace()
        .nth(2)
        .and_then(|x| x.parse().ok())
        .expect("util");
    assert!(util > 900, "unthrottled utilisation {util}");
}

#[test]
fn legacy_32_bit_allocations_are_refused_under_a_cap() {
    let out = Case::capped("legacy", GIB).run(&["legacy=4096"]);
    assert_eq!(stdout(&out), "legacy 801\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("pre-CUDA-3.2"));
}

#[test]
fn the_driver_calling_its_own_entry_points_is_not_charged_twice() {
    // the fake's cuMemAllocAsync calls the exported cuMemAllocFromPoolAsync
    let case = Case::capped("reentry", GIB);
    let out = case.run(&[&format!("async={}", 600 * MIB), "info"]);
    assert_eq!(
        lines(&out),
        ["async 0".to_string(), format!("info 0 {} {GIB}", 424 * MIB)]
    );
}

#[test]
fn the_real_driver_path_can_be_overridden() {
    let case = Case::capped("override", GIB);
    let e = env();
    let real = e.fake.join("libcuda.so.1");
    let mut c = case.command(&[&format!("alloc={}", 2 * GIB), "info"]);
    c.env_remove("LD_LIBRARY_PATH")
        .env("CLIENT_LIBCUDA", &real)
        .env("GANTRY_VCUDA_REAL_LIBCUDA", &real);
    let out = c.output().expect("run");
    assert_eq!(stdout(&out), format!("alloc 2\ninfo 0 {GIB} {GIB}\n"));
}

fn utilisation(case: &Case, cmd: &str, kernel_us: &str) -> (f64, Duration) {
    let t = Instant::now();
    let out = case.run_with(&[cmd], &[("FAKE_CUDA_KERNEL_US", kernel_us)]);
    let text = stdout(&out);
    let f: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(f.get(1), Some(&"0"), "{text}");
    let permille: f64 = f.get(2).and_then(|x| x.parse().ok()).expect("util");
    (permille / 1000.0, t.elapsed())
}

#[test]
fn launches_and_graphs_are_throttled_to_the_share() {
    for pct in [25u32, 50] {
        let case = Case::new(
            &format!("share-{pct}"),
            &format!(
                r#"{{"version":1,"accountFile":"@ACCOUNT@","devices":[{{"index":0,"computePercent":{pct}}}]}}"#
            ),
        );
        let share = f64::from(pct) / 100.0;
        for cmd in ["launch=120", "graph=120"] {
            let (u, took) = utilisation(&case, cmd, "2000");
            // The control law's accuracy (+-5 pp) is proven deterministically in the unit tests
            // against a simulated GPU. Here wall-clock timing on a shared machine only has to
            // show the throttle is wired into this launch path: unthrottled runs read ~1.0.
            assert!(
                (u - share).abs() <= 0.25,
                "{cmd} at {pct} %: utilisation {u:.3} ({took:?})"
            );
        }
    }
    // captured launches do not run, so they are not held back
    let case = Case::new(
        "share-capture",
        r#"{"version":1,"accountFile":"@ACCOUNT@","devices":[{"index":0,"computePercent":10}]}"#,
    );
    let (u, _) = utilisation(&case, "capture=50", "2000");
    assert!(u > 0.8, "capture {u}");
}

#[test]
fn symcheck_accepts_the_drivers_symbols_and_flags_a_new_variant() {
    let e = env();
    let nm = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(e.fake.join("libcuda.so.1"))
        .output()
        .expect("nm");
    assert!(nm.status.success());
    let check = |extra: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gantry-vcuda-symcheck"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("symcheck");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(&nm.stdout).expect("write");
            stdin.write_all(extra.as_bytes()).expect("write");
        }
        child.wait_with_output().expect("wait")
    };
    let ok = check("");
    assert!(ok.status.success(), "{}", stdout(&ok));
    let bad = check("0000000000001000 T cuMemAlloc_v3\n");
    assert_eq!(bad.status.code(), Some(1));
    assert!(stdout(&bad).contains("MISSING cuMemAlloc_v3"));
}
