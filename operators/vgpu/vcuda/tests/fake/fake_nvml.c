/* A fake libnvidia-ml.so.1 for the interception tests: two devices of 16 GiB, 1 GiB used. */
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include <stdlib.h>

typedef int nvmlReturn_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
#define MEM (16ULL << 30)
#define USED (1ULL << 30)
#define RESERVED (512ULL << 20)

static int index_of(void *d) {
    intptr_t i = (intptr_t)d - 0x1000;
    return i >= 0 && i < 2 ? (int)i : -1;
}
nvmlReturn_t nvmlInit_v2(void) { return 0; }
nvmlReturn_t nvmlInit(void) { return 0; }
nvmlReturn_t nvmlShutdown(void) { return 0; }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) { *n = 2; return 0; }
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **d) {
    if (i >= 2) return 2;
    *d = (void *)(intptr_t)(0x1000 + i);
    return 0;
}
nvmlReturn_t nvmlDeviceGetIndex(void *d, unsigned int *i) {
    if (index_of(d) < 0) return 2;
    *i = (unsigned int)index_of(d);
    return 0;
}
nvmlReturn_t nvmlDeviceGetUUID(void *d, char *buf, unsigned int len) {
    int i = index_of(d);
    if (i < 0) return 2;
    snprintf(buf, len, "GPU-6a1f9c2e-0b1d-4c55-9e3a-2f7d8c9b0a%02x", 0x10 + i);
    return 0;
}
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *u, void **d) {
    char buf[96];
    for (unsigned int i = 0; i < 2; i++) {
        nvmlDeviceGetUUID((void *)(intptr_t)(0x1000 + i), buf, sizeof buf);
        if (!strcmp(buf, u)) { *d = (void *)(intptr_t)(0x1000 + i); return 0; }
    }
    return 6; /* NOT_FOUND */
}
nvmlReturn_t nvmlDeviceGetMemoryInfo(void *d, nvmlMemory_t *m) {
    if (index_of(d) < 0 || !m) return 2;
    m->total = MEM; m->used = USED; m->free = MEM - USED;
    return 0;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(void *d, nvmlMemory_v2_t *m) {
    if (index_of(d) < 0 || !m) return 2;
    m->total = MEM; m->reserved = RESERVED; m->used = USED; m->free = MEM - USED - RESERVED;
    return 0;
}
nvmlReturn_t nvmlDeviceGetUtilizationRates(void *d, nvmlUtilization_t *u) {
    const char *v = getenv("FAKE_NVML_UTIL");
    if (index_of(d) < 0) return 2;
    u->gpu = v ? (unsigned int)atoi(v) : 0;
    u->memory = 0;
    return 0;
}
