/* Test client: drives the driver API like a runtime would, through dlopen + dlsym
 * (mode=dlsym) or through cuGetProcAddress_v2 obtained by dlsym (mode=gpa, the default, as
 * the CUDA runtime does). Commands come as arguments and print one line each. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct { size_t w, h; unsigned fmt, ch; } Desc;
typedef struct { size_t w, h, d; unsigned fmt, ch, flags; } Desc3;
typedef struct { unsigned type, handle_types, loc_type; int loc_id; void *win; unsigned char flags[8]; } Prop;
typedef struct { unsigned long long total, free, used; } Mem1;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } Mem2;

static void *lib;
static int use_gpa = 1, per_thread = 0, version = 12080;
typedef CUresult (*gpa_fn)(const char *, void **, int, unsigned long long, int *);
static gpa_fn gpa;

static void *get(const char *base, const char *versioned) {
    if (use_gpa) {
        void *p = NULL;
        int st = 0;
        if (gpa(base, &p, version, per_thread ? 2 : 0, &st) != 0) return NULL;
        return p;
    }
    char name[128];
    if (per_thread) {
        snprintf(name, sizeof name, "%s_ptsz", versioned ? versioned : base);
        void *p = dlsym(lib, name);
        if (p) return p;
    }
    return dlsym(lib, versioned ? versioned : base);
}
#define FN(var, base, versioned, ...) __typeof__(__VA_ARGS__) var = (__VA_ARGS__)get(base, versioned)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

enum { PTR, VMM, ARR, MIP };
static struct { int kind; unsigned long long h; } held[4096];
static int nheld;
static void keep(int kind, unsigned long long h) {
    if (nheld < 4096) { held[nheld].kind = kind; held[nheld].h = h; nheld++; }
}

typedef CUresult (*alloc_fn)(CUdeviceptr *, size_t);
static alloc_fn thread_alloc;
static size_t thread_bytes;
static int thread_n;
static int ok_count, oom_count;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static void *worker(void *arg) {
    (void)arg;
    for (int i = 0; i < thread_n; i++) {
        CUdeviceptr p;
        CUresult r = thread_alloc(&p, thread_bytes);
        pthread_mutex_lock(&mu);
        if (r == 0) ok_count++; else if (r == 2) oom_count++;
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

static double busy_now(void) {
    void (*stats)(double *, long *) = (void (*)(double *, long *))dlsym(lib, "fakeCudaStats");
    double b = 0;
    long n = 0;
    if (stats) stats(&b, &n);
    return b / 1e6;
}

int main(int argc, char **argv) {
    const char *path = getenv("CLIENT_LIBCUDA");
    lib = dlopen(path ? path : "libcuda.so.1", RTLD_NOW);
    if (!lib) { printf("dlopen failed %s\n", dlerror()); return 3; }
    gpa = (gpa_fn)dlsym(lib, "cuGetProcAddress_v2");
    for (int i = 1; i < argc; i++) {
        char *a = argv[i];
        unsigned long long x = 0, y = 0, z = 0;
        if (!strcmp(a, "mode=dlsym")) use_gpa = 0;
        else if (!strcmp(a, "mode=gpa")) use_gpa = 1;
        else if (!strcmp(a, "pt=1")) per_thread = 1;
        else if (sscanf(a, "version=%llu", &x) == 1) version = (int)x;
        else if (!strcmp(a, "init")) {
            FN(f, "cuInit", NULL, CUresult (*)(unsigned));
            printf("init %d\n", f(0));
        } else if (sscanf(a, "dev=%llu", &x) == 1) {
            FN(retain, "cuDevicePrimaryCtxRetain", NULL, CUresult (*)(void **, int));
            FN(set, "cuCtxSetCurrent", NULL, CUresult (*)(void *));
            void *ctx;
            retain(&ctx, (int)x);
            printf("dev %d\n", set(ctx));
        } else if (sscanf(a, "alloc=%llu", &x) == 1) {
            FN(f, "cuMemAlloc", "cuMemAlloc_v2", alloc_fn);
            CUdeviceptr p = 0;
            CUresult r = f(&p, x);
            if (!r) keep(PTR, p);
            printf("alloc %d\n", r);
        } else if (sscanf(a, "legacy=%llu", &x) == 1) {
            int saved = version;
            version = 3010; /* the pre-3.2 ABI */
            FN(f, "cuMemAlloc", "cuMemAlloc", CUresult (*)(unsigned *, unsigned));
            version = saved;
            unsigned p = 0;
            printf("legacy %d\n", f(&p, (unsigned)x));
        } else if (sscanf(a, "managed=%llu", &x) == 1) {
            FN(f, "cuMemAllocManaged", NULL, CUresult (*)(CUdeviceptr *, size_t, unsigned));
            CUdeviceptr p = 0;
            CUresult r = f(&p, x, 1);
            if (!r) keep(PTR, p);
            printf("managed %d\n", r);
        } else if (sscanf(a, "async=%llu", &x) == 1) {
            FN(f, "cuMemAllocAsync", NULL, CUresult (*)(CUdeviceptr *, size_t, void *));
            CUdeviceptr p = 0;
            CUresult r = f(&p, x, NULL);
            if (!r) keep(PTR, p);
            printf("async %d\n", r);
        } else if (sscanf(a, "pool=%llu", &x) == 1) {
            FN(f, "cuMemAllocFromPoolAsync", NULL, CUresult (*)(CUdeviceptr *, size_t, void *, void *));
            CUdeviceptr p = 0;
            CUresult r = f(&p, x, (void *)1, NULL);
            if (!r) keep(PTR, p);
            printf("pool %d\n", r);
        } else if (sscanf(a, "pitch=%llu,%llu", &x, &y) == 2) {
            FN(f, "cuMemAllocPitch", "cuMemAllocPitch_v2", CUresult (*)(CUdeviceptr *, size_t *, size_t, size_t, unsigned));
            CUdeviceptr p = 0;
            size_t pitch = 0;
            CUresult r = f(&p, &pitch, x, y, 4);
            if (!r) keep(PTR, p);
            printf("pitch %d %zu\n", r, pitch);
        } else if (sscanf(a, "create=%llu,%llu", &x, &y) == 2) {
            FN(f, "cuMemCreate", NULL, CUresult (*)(unsigned long long *, size_t, const Prop *, unsigned long long));
            Prop prop = {1, 0, (unsigned)(y >> 8), (int)(y & 0xff), NULL, {0}};
            unsigned long long h = 0;
            CUresult r = f(&h, x, &prop, 0);
            if (!r) keep(VMM, h);
            printf("create %d\n", r);
        } else if (sscanf(a, "array=%llu,%llu", &x, &y) == 2) {
            FN(f, "cuArrayCreate", "cuArrayCreate_v2", CUresult (*)(void **, const Desc *));
            Desc d = {x, y, 0x20, 4};
            void *h = NULL;
            CUresult r = f(&h, &d);
            if (!r) keep(ARR, (unsigned long long)h);
            printf("array %d\n", r);
        } else if (sscanf(a, "array3d=%llu,%llu,%llu", &x, &y, &z) == 3) {
            FN(f, "cuArray3DCreate", "cuArray3DCreate_v2", CUresult (*)(void **, const Desc3 *));
            Desc3 d = {x, y, z, 0x20, 4, 0};
            void *h = NULL;
            CUresult r = f(&h, &d);
            if (!r) keep(ARR, (unsigned long long)h);
            printf("array3d %d\n", r);
        } else if (sscanf(a, "mipmap=%llu,%llu,%llu", &x, &y, &z) == 3) {
            FN(f, "cuMipmappedArrayCreate", NULL, CUresult (*)(void **, const Desc3 *, unsigned));
            Desc3 d = {x, y, 0, 0x20, 4, 0};
            void *h = NULL;
            CUresult r = f(&h, &d, (unsigned)z);
            if (!r) keep(MIP, (unsigned long long)h);
            printf("mipmap %d\n", r);
        } else if (!strcmp(a, "freeall")) {
            FN(fr, "cuMemFree", "cuMemFree_v2", CUresult (*)(CUdeviceptr));
            FN(fra, "cuMemFreeAsync", NULL, CUresult (*)(CUdeviceptr, void *));
            FN(rel, "cuMemRelease", NULL, CUresult (*)(unsigned long long));
            FN(ad, "cuArrayDestroy", NULL, CUresult (*)(void *));
            FN(md, "cuMipmappedArrayDestroy", NULL, CUresult (*)(void *));
            int bad = 0;
            for (int k = 0; k < nheld; k++) {
                CUresult r = 0;
                switch (held[k].kind) {
                case PTR: r = (k % 2) ? fra(held[k].h, NULL) : fr(held[k].h); break;
                case VMM: r = rel(held[k].h); break;
                case ARR: r = ad((void *)held[k].h); break;
                case MIP: r = md((void *)held[k].h); break;
                }
                bad += r != 0;
            }
            printf("freeall %d %d\n", nheld, bad);
            nheld = 0;
        } else if (!strcmp(a, "info")) {
            FN(f, "cuMemGetInfo", "cuMemGetInfo_v2", CUresult (*)(size_t *, size_t *));
            size_t fr = 0, t = 0;
            CUresult r = f(&fr, &t);
            printf("info %d %zu %zu\n", r, fr, t);
        } else if (sscanf(a, "total=%llu", &x) == 1) {
            FN(f, "cuDeviceTotalMem", "cuDeviceTotalMem_v2", CUresult (*)(size_t *, int));
            size_t t = 0;
            CUresult r = f(&t, (int)x);
            printf("total %d %zu\n", r, t);
        } else if (sscanf(a, "nvml=%llu", &x) == 1) {
            void *n = dlopen("libnvidia-ml.so.1", RTLD_NOW);
            if (!n) { printf("nvml dlopen failed\n"); continue; }
            int (*init)(void) = (int (*)(void))dlsym(n, "nvmlInit_v2");
            int (*by)(unsigned, void **) = (int (*)(unsigned, void **))dlsym(n, "nvmlDeviceGetHandleByIndex_v2");
            int (*m1)(void *, Mem1 *) = (int (*)(void *, Mem1 *))dlsym(n, "nvmlDeviceGetMemoryInfo");
            int (*m2)(void *, Mem2 *) = (int (*)(void *, Mem2 *))dlsym(n, "nvmlDeviceGetMemoryInfo_v2");
            void *d = NULL;
            init();
            by((unsigned)x, &d);
            Mem1 a1 = {0};
            Mem2 a2 = {0};
            int r1 = m1(d, &a1);
            a2.version = (unsigned)(sizeof(Mem2) | (2u << 24));
            int r2 = m2(d, &a2);
            printf("nvml %d %llu %llu %llu\n", r1, a1.total, a1.used, a1.free);
            printf("nvml2 %d %llu %llu %llu %llu\n", r2, a2.total, a2.used, a2.free, a2.reserved);
        } else if (!strcmp(a, "check")) {
            static const char *names[][2] = {
                {"cuInit", NULL}, {"cuGetProcAddress", "cuGetProcAddress_v2"},
                {"cuMemAlloc", "cuMemAlloc_v2"}, {"cuMemAllocManaged", NULL},
                {"cuMemAllocPitch", "cuMemAllocPitch_v2"}, {"cuMemAllocAsync", NULL},
                {"cuMemAllocFromPoolAsync", NULL}, {"cuMemCreate", NULL},
                {"cuArrayCreate", "cuArrayCreate_v2"}, {"cuArray3DCreate", "cuArray3DCreate_v2"},
                {"cuMipmappedArrayCreate", NULL}, {"cuMemFree", "cuMemFree_v2"},
                {"cuMemFreeAsync", NULL}, {"cuMemRelease", NULL}, {"cuArrayDestroy", NULL},
                {"cuMipmappedArrayDestroy", NULL}, {"cuMemGetInfo", "cuMemGetInfo_v2"},
                {"cuDeviceTotalMem", "cuDeviceTotalMem_v2"}, {"cuLaunchKernel", NULL},
                {"cuLaunchKernelEx", NULL}, {"cuLaunchCooperativeKernel", NULL},
                {"cuGraphLaunch", NULL}, {"cuLaunch", NULL}, {"cuLaunchGrid", NULL},
                {"cuLaunchGridAsync", NULL},
                /* not intercepted: must come from the driver itself */
                {"cuCtxSetCurrent", NULL}, {"cuEventRecord", NULL},
            };
            int n = sizeof names / sizeof names[0], hooked = 0;
            for (int k = 0; k < n; k++) {
                void *p = get(names[k][0], names[k][1]);
                Dl_info info;
                const char *where = p && dladdr(p, &info) && info.dli_fname ? info.dli_fname : "none";
                int ours = strstr(where, "gantry_vcuda") != NULL;
                hooked += ours;
                printf("%s %s\n", ours ? "hooked" : "real", names[k][1] ? names[k][1] : names[k][0]);
            }
            printf("check %d %d\n", hooked, n);
        } else if (sscanf(a, "launch=%llu", &x) == 1 || sscanf(a, "graph=%llu", &y) == 1 ||
                   sscanf(a, "capture=%llu", &z) == 1) {
            FN(lk, "cuLaunchKernel", NULL, CUresult (*)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **));
            FN(gl, "cuGraphLaunch", NULL, CUresult (*)(void *, void *));
            FN(sync, "cuCtxSynchronize", NULL, CUresult (*)(void));
            int graph = !strncmp(a, "graph=", 6), capture = !strncmp(a, "capture=", 8);
            unsigned long long n = graph ? y : capture ? z : x;
            double b0 = busy_now(), t0 = now_s();
            CUresult r = 0;
            for (unsigned long long k = 0; k < n && !r; k++)
                r = graph ? gl((void *)0x5678, NULL) : lk((void *)0x1234, 1, 1, 1, 1, 1, 1, 0, capture ? (void *)0xCA97 : NULL, NULL, NULL);
            sync();
            double wall = now_s() - t0, busy = busy_now() - b0;
            printf("%s %d %d\n", graph ? "graph" : capture ? "capture" : "launch", r, (int)(1000 * busy / wall));
        } else if (!strcmp(a, "hold")) {
            printf("holding\n");
            fflush(stdout);
            for (;;) pause();
        } else if (sscanf(a, "threads=%llu,%llu,%llu", &x, &y, &z) == 3) {
            thread_alloc = (alloc_fn)get("cuMemAlloc", "cuMemAlloc_v2");
            thread_n = (int)y;
            thread_bytes = z;
            pthread_t t[64];
            for (unsigned long long k = 0; k < x && k < 64; k++) pthread_create(&t[k], NULL, worker, NULL);
            for (unsigned long long k = 0; k < x && k < 64; k++) pthread_join(t[k], NULL);
            printf("threads %d %d\n", ok_count, oom_count);
        } else {
            printf("unknown %s\n", a);
            return 4;
        }
        fflush(stdout);
    }
    return 0;
}
