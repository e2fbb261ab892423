/*
 * A toy backend plugin written in C against include/eptc_plugin.h, for the ABI's tests:
 * it runs exactly the graphs `y = neg(x)` (one input, one `neg`, one output) on host
 * memory. Built by tests/c_plugin.rs in variants that must be refused:
 *   -DEPTC_TEST_API_VERSION=2   another API version
 *   -DEPTC_TEST_SHORT_TABLE     a struct_size that stops before `run`
 *   -DEPTC_TEST_FAIL_INIT       an init that fails with a message
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eptc_plugin.h"

#ifndef EPTC_TEST_API_VERSION
#define EPTC_TEST_API_VERSION EPTC_API_VERSION
#endif

#define MAX_RANK 8

struct EptcBuffer {
    uint32_t rank;
    uint64_t shape[MAX_RANK];
    size_t numel;
    float *data;
};

struct EptcExecutable {
    char *input;  /* the graph's input name */
    double last_seconds;
};

static EptcStatus fail(char **error, EptcStatus status, const char *fmt, const char *arg) {
    if (error) {
        size_t n = strlen(fmt) + (arg ? strlen(arg) : 0) + 1;
        char *m = malloc(n);
        snprintf(m, n, fmt, arg ? arg : "");
        *error = m;
    }
    return status;
}

static char *copy_str(const char *s) {
    char *d = malloc(strlen(s) + 1);
    strcpy(d, s);
    return d;
}

static const char *name(void) { return "c-negate"; }
static const char *version(void) { return "0.0.1-c"; }

static EptcStatus init(char **error) {
#ifdef EPTC_TEST_FAIL_INIT
    return fail(error, EPTC_ERR_UNAVAILABLE, "no XPU 9000 found (%s)", "checked /dev/xpu0");
#else
    (void)error;
    return EPTC_OK;
#endif
}

static EptcStatus availability(char **detail) {
    if (detail) *detail = copy_str("host memory, one thread");
    return EPTC_OK;
}

static EptcStatus capabilities(char **json, char **error) {
    if (!json) return fail(error, EPTC_ERR_INVALID_ARGUMENT, "json is NULL%s", NULL);
    /* An unknown key and an unknown dtype: the host ignores both. */
    *json = copy_str("{\"ops\":[\"input\",\"neg\"],\"fused_ops\":[],"
                "\"dtypes\":[\"f32\",\"f8e4m3\"],\"vendor\":{\"xpu\":true}}");
    return EPTC_OK;
}

static EptcStatus compile(const char *ir_text, const EptcTensorDesc *weights, size_t n_weights,
                          const EptcCompileOptions *options, EptcExecutable **executable,
                          char **error) {
    (void)weights;
    if (!ir_text || !options || !executable)
        return fail(error, EPTC_ERR_INVALID_ARGUMENT, "a NULL argument%s", NULL);
    if (strncmp(ir_text, "eptc-ir 1 ", 10) != 0)
        return fail(error, EPTC_ERR_INVALID_ARGUMENT, "IR: not format version 1%s", NULL);
    if (options->dtype != EPTC_DTYPE_F32)
        return fail(error, EPTC_ERR_UNSUPPORTED, "only f32 storage%s", NULL);
    if (n_weights != 0 || strstr(ir_text, " = param ") != NULL)
        return fail(error, EPTC_ERR_UNSUPPORTED, "this plugin takes no parameters%s", NULL);
    /* %0 = input "NAME" : ...  and  %1 = neg %0 : ... */
    const char *in = strstr(ir_text, "%0 = input \"");
    if (!in || !strstr(ir_text, "%1 = neg %0") || strstr(ir_text, "%2 = "))
        return fail(error, EPTC_ERR_UNSUPPORTED,
                    "the graph is not y = neg(x): this plugin only negates%s", NULL);
    in += strlen("%0 = input \"");
    const char *end = strchr(in, '"');
    EptcExecutable *e = calloc(1, sizeof *e);
    e->input = calloc((size_t)(end - in) + 1, 1);
    memcpy(e->input, in, (size_t)(end - in));
    e->last_seconds = -1.0;
    *executable = e;
    return EPTC_OK;
}

static EptcStatus set_param(EptcExecutable *executable, const char *pname,
                            const EptcTensorDesc *value, char **error) {
    (void)executable;
    (void)value;
    return fail(error, EPTC_ERR_MISSING_PARAM, "no parameter named \"%s\" in y = neg(x)", pname);
}

static EptcStatus buffer_alloc(uint32_t dtype, uint32_t rank, const uint64_t *shape,
                               EptcBuffer **buffer, char **error) {
    if (!buffer) return fail(error, EPTC_ERR_INVALID_ARGUMENT, "buffer is NULL%s", NULL);
    if (dtype != EPTC_DTYPE_F32)
        return fail(error, EPTC_ERR_UNSUPPORTED, "only f32 buffers%s", NULL);
    if (rank > MAX_RANK || (rank > 0 && !shape))
        return fail(error, EPTC_ERR_INVALID_ARGUMENT, "bad shape%s", NULL);
    EptcBuffer *b = calloc(1, sizeof *b);
    b->rank = rank;
    b->numel = 1;
    for (uint32_t i = 0; i < rank; i++) {
        b->shape[i] = shape[i];
        b->numel *= (size_t)shape[i];
    }
    b->data = calloc(b->numel ? b->numel : 1, sizeof(float));
    *buffer = b;
    return EPTC_OK;
}

static EptcStatus buffer_upload(EptcBuffer *b, const void *data, size_t byte_len, char **error) {
    if (!b || byte_len != b->numel * sizeof(float))
        return fail(error, EPTC_ERR_SHAPE_MISMATCH, "upload: wrong byte length%s", NULL);
    memcpy(b->data, data, byte_len);
    return EPTC_OK;
}

static EptcStatus buffer_download(const EptcBuffer *b, void *data, size_t byte_len,
                                  char **error) {
    if (!b || byte_len != b->numel * sizeof(float))
        return fail(error, EPTC_ERR_SHAPE_MISMATCH, "download: wrong byte length%s", NULL);
    memcpy(data, b->data, byte_len);
    return EPTC_OK;
}

static EptcStatus buffer_info(const EptcBuffer *b, uint32_t *dtype, uint32_t *rank,
                              uint64_t *shape, uint32_t shape_capacity, char **error) {
    if (!b || !dtype || !rank) return fail(error, EPTC_ERR_INVALID_ARGUMENT, "NULL%s", NULL);
    *dtype = EPTC_DTYPE_F32;
    *rank = b->rank;
    for (uint32_t i = 0; i < b->rank && i < shape_capacity; i++) shape[i] = b->shape[i];
    return EPTC_OK;
}

static void buffer_free(EptcBuffer *b) {
    if (!b) return;
    free(b->data);
    free(b);
}

static EptcStatus run(EptcExecutable *e, const char *const *input_names,
                      EptcBuffer *const *inputs, size_t n_inputs, EptcBuffer **outputs,
                      size_t n_outputs, char **error) {
    if (!e) return fail(error, EPTC_ERR_INVALID_ARGUMENT, "executable is NULL%s", NULL);
    if (n_inputs != 1 || strcmp(input_names[0], e->input) != 0)
        return fail(error, EPTC_ERR_INVALID_ARGUMENT, "expects exactly one input, \"%s\"",
                    e->input);
    if (n_outputs != 1)
        return fail(error, EPTC_ERR_INVALID_ARGUMENT, "the graph has one output%s", NULL);
    const EptcBuffer *x = inputs[0];
    EptcBuffer *y = NULL;
    EptcStatus s = buffer_alloc(EPTC_DTYPE_F32, x->rank, x->shape, &y, error);
    if (s != EPTC_OK) return s;
    for (size_t i = 0; i < x->numel; i++) y->data[i] = -x->data[i];
    outputs[0] = y;
    e->last_seconds = 0.25;
    return EPTC_OK;
}

static void free_executable(EptcExecutable *e) {
    if (!e) return;
    free(e->input);
    free(e);
}

static void free_string(char *s) { free(s); }

static double device_seconds(const EptcExecutable *e) { return e ? e->last_seconds : -1.0; }

static const EptcPluginApi API = {
#ifdef EPTC_TEST_SHORT_TABLE
    .struct_size = offsetof(EptcPluginApi, run),
#else
    .struct_size = sizeof(EptcPluginApi),
#endif
    .api_version = EPTC_TEST_API_VERSION,
    .name = name,
    .version = version,
    .init = init,
    .availability = availability,
    .capabilities = capabilities,
    .compile = compile,
    .set_param = set_param,
    .run = run,
    .free_executable = free_executable,
    .buffer_alloc = buffer_alloc,
    .buffer_upload = buffer_upload,
    .buffer_download = buffer_download,
    .buffer_info = buffer_info,
    .buffer_free = buffer_free,
    .free_string = free_string,
    .device_seconds = device_seconds,
    .kernels = NULL, /* optional: generates no code */
};

const EptcPluginApi *eptc_plugin_api(void) { return &API; }
