/*
 * eptc backend plugin ABI, version 1.
 *
 * The C spelling of `eptc_plugin::abi` (crates/eptc-plugin/src/abi.rs), which documents
 * every field; the two are kept in step by the crate's tests (a C plugin built from this
 * header is loaded and run by tests/c_plugin.rs).
 *
 * A plugin is a shared library exporting
 *
 *     const EptcPluginApi *eptc_plugin_api(void);
 *
 * which returns a table that stays valid while the library is loaded (a static).
 * Every fallible entry returns an EptcStatus and, on failure, stores a message allocated
 * by the plugin through its last argument (which may be NULL); the host frees it with
 * free_string. Graphs cross as the IR text format (ir-specs/README.md), tensors as dense
 * row-major buffers in native byte order.
 */
#ifndef EPTC_PLUGIN_H
#define EPTC_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EPTC_API_VERSION 1u
#define EPTC_PLUGIN_SYMBOL "eptc_plugin_api"

typedef int32_t EptcStatus;
#define EPTC_OK 0
#define EPTC_ERR_INVALID_ARGUMENT 1
#define EPTC_ERR_UNSUPPORTED 2
#define EPTC_ERR_UNAVAILABLE 3
#define EPTC_ERR_MISSING_PARAM 4
#define EPTC_ERR_SHAPE_MISMATCH 5
#define EPTC_ERR_INTERNAL 6
#define EPTC_ERR_PANIC 7

#define EPTC_DTYPE_F32 0u
#define EPTC_DTYPE_F16 1u
#define EPTC_DTYPE_BF16 2u

typedef struct EptcExecutable EptcExecutable; /* opaque, the plugin's */
typedef struct EptcBuffer EptcBuffer;         /* opaque, the plugin's */

typedef struct {
    const char *name;      /* NUL-terminated UTF-8; NULL where the call names the tensor */
    uint32_t dtype;        /* EPTC_DTYPE_* */
    uint32_t rank;
    const uint64_t *shape; /* rank dims; may be NULL when rank == 0 */
    const void *data;      /* byte_len bytes, valid during the call only */
    size_t byte_len;       /* product(shape) * size of dtype */
} EptcTensorDesc;

typedef struct {
    uint64_t threads; /* 0 = the plugin's default */
    uint32_t dtype;   /* EPTC_DTYPE_*: storage type of device tensors */
} EptcCompileOptions;

typedef struct {
    size_t struct_size;   /* sizeof(EptcPluginApi) as built */
    uint32_t api_version; /* EPTC_API_VERSION */

    const char *(*name)(void);    /* static */
    const char *(*version)(void); /* static */
    EptcStatus (*init)(char **error);
    EptcStatus (*availability)(char **detail); /* EPTC_OK or EPTC_ERR_UNAVAILABLE */
    /* {"ops":[...],"fused_ops":[...],"dtypes":["f32",...]} */
    EptcStatus (*capabilities)(char **json, char **error);
    EptcStatus (*compile)(const char *ir_text, const EptcTensorDesc *weights,
                          size_t n_weights, const EptcCompileOptions *options,
                          EptcExecutable **executable, char **error);
    EptcStatus (*set_param)(EptcExecutable *executable, const char *name,
                            const EptcTensorDesc *value, char **error);
    /* outputs: n_outputs new buffers, in the order of the IR text's `output` lines */
    EptcStatus (*run)(EptcExecutable *executable, const char *const *input_names,
                      EptcBuffer *const *inputs, size_t n_inputs, EptcBuffer **outputs,
                      size_t n_outputs, char **error);
    void (*free_executable)(EptcExecutable *executable);
    EptcStatus (*buffer_alloc)(uint32_t dtype, uint32_t rank, const uint64_t *shape,
                               EptcBuffer **buffer, char **error);
    EptcStatus (*buffer_upload)(EptcBuffer *buffer, const void *data, size_t byte_len,
                                char **error);
    EptcStatus (*buffer_download)(const EptcBuffer *buffer, void *data, size_t byte_len,
                                  char **error);
    EptcStatus (*buffer_info)(const EptcBuffer *buffer, uint32_t *dtype, uint32_t *rank,
                              uint64_t *shape, uint32_t shape_capacity, char **error);
    void (*buffer_free)(EptcBuffer *buffer);
    void (*free_string)(char *s);
    /* optional (may be NULL): */
    double (*device_seconds)(const EptcExecutable *executable); /* < 0: unknown */
    /* [{"name":..,"extension":..,"source":..}, ...] */
    EptcStatus (*kernels)(const char *ir_text, uint64_t batch, uint32_t dtype, char **json,
                          char **error);
} EptcPluginApi;

const EptcPluginApi *eptc_plugin_api(void);

#ifdef __cplusplus
}
#endif

#endif /* EPTC_PLUGIN_H */
