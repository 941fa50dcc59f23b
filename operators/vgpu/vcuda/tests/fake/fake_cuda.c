/* A fake libcuda.so.1 for the interception tests: just the calls the tests make.
 *
 * Two devices of 16 GiB. Allocations hand out unique fake addresses. Kernels "run" on a
 * simulated timeline: each launch occupies the GPU for FAKE_CUDA_KERNEL_US microseconds after
 * the previous one; events complete when the timeline passes them, as on a real GPU.
 * Built with -Bsymbolic, like a real driver its cuGetProcAddress hands out its own addresses.
 * cuMemAllocAsync calls the exported cuMemAllocFromPoolAsync through the global scope, as a
 * driver calling its own entry points would: the interceptor must not charge it twice. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
#define OK 0
#define INVALID_VALUE 1
#define OUT_OF_MEMORY 2
#define NOT_READY 600
#define NDEV 2
#define MEM (16ULL << 30)

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned long long next_addr = 0x7f0000000000ULL;
static unsigned long long used[NDEV];
static __thread int cur_dev = 0;
static double gpu_free_at, busy_us;
static long launches;

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static unsigned long long take(int dev, unsigned long long size) {
    pthread_mutex_lock(&mu);
    unsigned long long a = 0;
    if (dev >= 0 && dev < NDEV && used[dev] + size <= MEM) {
        used[dev] += size;
        a = next_addr;
        next_addr += (size + 4095) & ~4095ULL;
        if (size == 0) next_addr += 4096;
    }
    pthread_mutex_unlock(&mu);
    return a;
}

CUresult cuInit(unsigned int flags) { (void)flags; return OK; }
CUresult cuDriverGetVersion(int *v) { *v = 12080; return OK; }
CUresult cuDeviceGetCount(int *n) { *n = NDEV; return OK; }
CUresult cuDeviceGet(int *d, int ordinal) {
    if (ordinal < 0 || ordinal >= NDEV) return INVALID_VALUE;
    *d = ordinal;
    return OK;
}
static void uuid_of(int dev, unsigned char out[16]) {
    static const unsigned char base[16] = {0x6a, 0x1f, 0x9c, 0x2e, 0x0b, 0x1d, 0x4c, 0x55,
                                           0x9e, 0x3a, 0x2f, 0x7d, 0x8c, 0x9b, 0x0a, 0x10};
    memcpy(out, base, 16);
    out[15] = (unsigned char)(0x10 + dev);
}
CUresult cuDeviceGetUuid(unsigned char *uuid, int dev) {
    if (dev < 0 || dev >= NDEV) return INVALID_VALUE;
    uuid_of(dev, uuid);
    return OK;
}
CUresult cuDeviceGetUuid_v2(unsigned char *uuid, int dev) { return cuDeviceGetUuid(uuid, dev); }
CUresult cuDeviceTotalMem_v2(size_t *bytes, int dev) {
    if (dev < 0 || dev >= NDEV) return INVALID_VALUE;
    *bytes = MEM;
    return OK;
}
CUresult cuDeviceTotalMem(unsigned int *bytes, int dev) { (void)dev; *bytes = 0xffffffffu; return OK; }
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) {
    *ctx = (void *)(intptr_t)(dev + 1);
    return OK;
}
CUresult cuCtxSetCurrent(void *ctx) {
    cur_dev = (int)(intptr_t)ctx - 1;
    return OK;
}
CUresult cuCtxGetCurrent(void **ctx) { *ctx = (void *)(intptr_t)(cur_dev + 1); return OK; }
CUresult cuCtxGetDevice(int *dev) { *dev = cur_dev; return OK; }
CUresult cuMemGetInfo_v2(size_t *free_, size_t *total) {
    pthread_mutex_lock(&mu);
    *free_ = MEM - used[cur_dev];
    pthread_mutex_unlock(&mu);
    *total = MEM;
    return OK;
}
CUresult cuMemGetInfo(unsigned int *free_, unsigned int *total) {
    *free_ = 0xffffffffu;
    *total = 0xffffffffu;
    return OK;
}

static CUresult alloc_on(int dev, CUdeviceptr *p, size_t n) {
    if (!p) return INVALID_VALUE;
    unsigned long long a = take(dev, n);
    if (!a) return OUT_OF_MEMORY;
    *p = a;
    return OK;
}
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { return alloc_on(cur_dev, p, n); }
CUresult cuMemAlloc(unsigned int *p, unsigned int n) { (void)n; *p = 0x1000; return OK; }
CUresult cuMemAllocManaged(CUdeviceptr *p, size_t n, unsigned int f) { (void)f; return alloc_on(cur_dev, p, n); }
CUresult cuMemAllocPitch_v2(CUdeviceptr *p, size_t *pitch, size_t w, size_t h, unsigned int e) {
    (void)e;
    *pitch = (w + 511) & ~(size_t)511;
    return alloc_on(cur_dev, p, *pitch * h);
}
CUresult cuMemAllocPitch(unsigned int *p, unsigned int *pitch, unsigned int w, unsigned int h, unsigned int e) {
    (void)h; (void)e; *p = 0x1000; *pitch = w; return OK;
}
CUresult cuMemAllocFromPoolAsync(CUdeviceptr *p, size_t n, void *pool, void *s) {
    (void)pool; (void)s;
    return alloc_on(cur_dev, p, n);
}
CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *p, size_t n, void *pool, void *s) {
    return cuMemAllocFromPoolAsync(p, n, pool, s);
}
typedef CUresult (*pool_fn)(CUdeviceptr *, size_t, void *, void *);
CUresult cuMemAllocAsync(CUdeviceptr *p, size_t n, void *s) {
    /* the default pool path goes through the exported pool entry point */
    pool_fn f = (pool_fn)dlsym(RTLD_DEFAULT, "cuMemAllocFromPoolAsync");
    return f ? f(p, n, (void *)1, s) : alloc_on(cur_dev, p, n);
}
CUresult cuMemAllocAsync_ptsz(CUdeviceptr *p, size_t n, void *s) { return cuMemAllocAsync(p, n, s); }

/* frees: the fake does not track sizes per pointer; the tests only check the interceptor */
CUresult cuMemFree_v2(CUdeviceptr p) { return p ? OK : INVALID_VALUE; }
CUresult cuMemFree(unsigned int p) { (void)p; return OK; }
CUresult cuMemFreeAsync(CUdeviceptr p, void *s) { (void)s; return p ? OK : INVALID_VALUE; }
CUresult cuMemFreeAsync_ptsz(CUdeviceptr p, void *s) { return cuMemFreeAsync(p, s); }

typedef struct { unsigned int type, handle_types, loc_type; int loc_id; } Prop;
CUresult cuMemCreate(unsigned long long *h, size_t n, const Prop *prop, unsigned long long flags) {
    (void)flags;
    if (!prop || !h) return INVALID_VALUE;
    unsigned long long a = take(prop->loc_type == 1 ? prop->loc_id : 0, n);
    if (!a) return OUT_OF_MEMORY;
    *h = a;
    return OK;
}
CUresult cuMemRelease(unsigned long long h) { return h ? OK : INVALID_VALUE; }

static CUresult new_handle(void **out) {
    if (!out) return INVALID_VALUE;
    *out = (void *)(uintptr_t)take(cur_dev, 0);
    return OK;
}
CUresult cuArrayCreate_v2(void **a, const void *d) { (void)d; return new_handle(a); }
CUresult cuArrayCreate(void **a, const void *d) { (void)d; return new_handle(a); }
CUresult cuArray3DCreate_v2(void **a, const void *d) { (void)d; return new_handle(a); }
CUresult cuArray3DCreate(void **a, const void *d) { (void)d; return new_handle(a); }
CUresult cuMipmappedArrayCreate(void **a, const void *d, unsigned int l) { (void)d; (void)l; return new_handle(a); }
CUresult cuArrayDestroy(void *a) { return a ? OK : INVALID_VALUE; }
CUresult cuMipmappedArrayDestroy(void *a) { return a ? OK : INVALID_VALUE; }

/* ---- the simulated timeline ---- */
static double kernel_us(const char *env) {
    const char *v = getenv(env);
    if (!v) v = getenv("FAKE_CUDA_KERNEL_US");
    return v ? atof(v) : 0.0;
}
static CUresult run(double dur) {
    pthread_mutex_lock(&mu);
    double t = now_us();
    double start = gpu_free_at > t ? gpu_free_at : t;
    gpu_free_at = start + dur;
    busy_us += dur;
    launches++;
    pthread_mutex_unlock(&mu);
    return OK;
}
/* test hook: GPU time used and launches made by this process */
void fakeCudaStats(double *busy, long *n) {
    pthread_mutex_lock(&mu);
    *busy = busy_us;
    *n = launches;
    pthread_mutex_unlock(&mu);
}
#define KARGS void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned sh, void *s
CUresult cuLaunchKernel(KARGS, void **p, void **e) { (void)f;(void)gx;(void)gy;(void)gz;(void)bx;(void)by;(void)bz;(void)sh;(void)s;(void)p;(void)e; return run(kernel_us("FAKE_CUDA_KERNEL_US")); }
CUresult cuLaunchKernel_ptsz(KARGS, void **p, void **e) { return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, sh, s, p, e); }
CUresult cuLaunchCooperativeKernel(KARGS, void **p) { return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, sh, s, p, 0); }
CUresult cuLaunchCooperativeKernel_ptsz(KARGS, void **p) { return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, sh, s, p, 0); }
CUresult cuLaunchKernelEx(const void *c, void *f, void **p, void **e) { (void)c;(void)f;(void)p;(void)e; return run(kernel_us("FAKE_CUDA_KERNEL_US")); }
CUresult cuLaunchKernelEx_ptsz(const void *c, void *f, void **p, void **e) { return cuLaunchKernelEx(c, f, p, e); }
CUresult cuGraphLaunch(void *g, void *s) { (void)g; (void)s; return run(kernel_us("FAKE_CUDA_GRAPH_US")); }
CUresult cuGraphLaunch_ptsz(void *g, void *s) { return cuGraphLaunch(g, s); }
CUresult cuLaunch(void *f) { (void)f; return run(kernel_us("FAKE_CUDA_KERNEL_US")); }
CUresult cuLaunchGrid(void *f, int w, int h) { (void)f; (void)w; (void)h; return run(kernel_us("FAKE_CUDA_KERNEL_US")); }
CUresult cuLaunchGridAsync(void *f, int w, int h, void *s) { (void)f; (void)w; (void)h; (void)s; return run(kernel_us("FAKE_CUDA_KERNEL_US")); }

#define CAPTURING_STREAM ((void *)0xCA97)
CUresult cuStreamIsCapturing(void *s, int *status) { *status = s == CAPTURING_STREAM; return OK; }

typedef struct { double t; } Event;
CUresult cuEventCreate(void **e, unsigned int flags) {
    (void)flags;
    *e = calloc(1, sizeof(Event));
    return *e ? OK : OUT_OF_MEMORY;
}
CUresult cuEventRecord(void *e, void *s) {
    (void)s;
    pthread_mutex_lock(&mu);
    double t = now_us();
    ((Event *)e)->t = gpu_free_at > t ? gpu_free_at : t;
    pthread_mutex_unlock(&mu);
    return OK;
}
CUresult cuEventQuery(void *e) { return now_us() >= ((Event *)e)->t ? OK : NOT_READY; }
CUresult cuEventSynchronize(void *e) {
    double d = ((Event *)e)->t - now_us();
    if (d > 0) usleep((useconds_t)d + 1);
    return OK;
}
CUresult cuEventElapsedTime(float *ms, void *a, void *b) {
    *ms = (float)((((Event *)b)->t - ((Event *)a)->t) / 1000.0);
    return OK;
}
CUresult cuEventDestroy_v2(void *e) { free(e); return OK; }
CUresult cuCtxSynchronize(void) {
    double d = gpu_free_at - now_us();
    if (d > 0) usleep((useconds_t)d + 1);
    return OK;
}

/* ---- entry points: the driver's own addresses, chosen by version and flags ---- */
CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, unsigned long long flags);
CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, unsigned long long flags, int *st);
struct entry { const char *name; void *fn; };
#define E(n) {#n, (void *)n}
static const struct entry table[] = {
    E(cuInit), E(cuDriverGetVersion), E(cuDeviceGetCount), E(cuDeviceGet), E(cuDeviceGetUuid),
    E(cuDeviceGetUuid_v2), E(cuDeviceTotalMem), E(cuDeviceTotalMem_v2), E(cuDevicePrimaryCtxRetain),
    E(cuCtxSetCurrent), E(cuCtxGetCurrent), E(cuCtxGetDevice), E(cuCtxSynchronize),
    E(cuMemGetInfo), E(cuMemGetInfo_v2), E(cuMemAlloc), E(cuMemAlloc_v2), E(cuMemAllocManaged),
    E(cuMemAllocPitch), E(cuMemAllocPitch_v2), E(cuMemAllocAsync), E(cuMemAllocAsync_ptsz),
    E(cuMemAllocFromPoolAsync), E(cuMemAllocFromPoolAsync_ptsz), E(cuMemFree), E(cuMemFree_v2),
    E(cuMemFreeAsync), E(cuMemFreeAsync_ptsz), E(cuMemCreate), E(cuMemRelease),
    E(cuArrayCreate), E(cuArrayCreate_v2), E(cuArray3DCreate), E(cuArray3DCreate_v2),
    E(cuMipmappedArrayCreate), E(cuArrayDestroy), E(cuMipmappedArrayDestroy),
    E(cuLaunchKernel), E(cuLaunchKernel_ptsz), E(cuLaunchKernelEx), E(cuLaunchKernelEx_ptsz),
    E(cuLaunchCooperativeKernel), E(cuLaunchCooperativeKernel_ptsz), E(cuGraphLaunch),
    E(cuGraphLaunch_ptsz), E(cuLaunch), E(cuLaunchGrid), E(cuLaunchGridAsync),
    E(cuStreamIsCapturing), E(cuEventCreate), E(cuEventRecord), E(cuEventQuery),
    E(cuEventSynchronize), E(cuEventElapsedTime), E(cuEventDestroy_v2),
    E(cuGetProcAddress), E(cuGetProcAddress_v2),
};
static void *find(const char *name) {
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (!strcmp(table[i].name, name)) return table[i].fn;
    return NULL;
}
CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, unsigned long long flags, int *st) {
    char name[128];
    void *f = NULL;
    if (!sym || !pfn || strlen(sym) > 100) return INVALID_VALUE;
    if (flags & 2) { /* per-thread default stream */
        snprintf(name, sizeof name, "%s_ptsz", sym);
        f = find(name);
    }
    int v2_since = !strcmp(sym, "cuGetProcAddress") ? 12000 : 3020;
    if (!f && ver >= v2_since) {
        snprintf(name, sizeof name, "%s_v2", sym);
        f = find(name);
    }
    if (!f) f = find(sym);
    *pfn = f;
    if (st) *st = f ? 0 : 1;
    return OK;
}
CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, unsigned long long flags) {
    return cuGetProcAddress_v2(sym, pfn, ver, flags, NULL);
}
