/* turboprefill.h — the public C ABI of the TurboPrefill engine.
 *
 * Everything a binding needs and nothing more: opaque handles, plain structs, tp_status codes with fixed
 * values, and tp_last_error() for the message of the last failure on the calling thread. No C++ type
 * crosses this boundary; every function catches everything and returns a status.
 *
 * Lifetimes: strings returned as `const char*` belong to the library and stay valid until the next call
 * on the same thread (tp_last_error) or until the owning handle is freed. Buffers passed in are the
 * caller's; the library never keeps a pointer to them after the call returns.
 */
#ifndef TURBOPREFILL_H
#define TURBOPREFILL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define TP_API __declspec(dllexport)
#else
#define TP_API __attribute__((visibility("default")))
#endif

/* Status codes. Values are stable: bindings map them to exception types. */
typedef enum tp_status {
  TP_OK = 0,
  TP_ERR_INVALID_ARGUMENT = 1, /* a parameter is out of range or inconsistent */
  TP_ERR_IO = 2,               /* the file cannot be opened, read or mapped */
  TP_ERR_FORMAT = 3,           /* the GGUF file is truncated, corrupt or inconsistent */
  TP_ERR_UNSUPPORTED = 4,      /* valid input this engine does not handle (architecture, tensor type) */
  TP_ERR_OUT_OF_MEMORY = 5,    /* an allocation failed (host or device) */
  TP_ERR_CONTEXT_OVERFLOW = 6, /* the prompt does not fit in the remaining context */
  TP_ERR_DEVICE = 7,           /* a device (GPU driver, CUDA runtime) failed or is missing */
  TP_ERR_CANCELLED = 8,        /* tp_engine_cancel() stopped the call */
  TP_ERR_INTERNAL = 9          /* a bug: please report it with the message */
} tp_status;

/* ggml tensor type ids (same values as ggml's enum). */
typedef enum tp_type {
  TP_TYPE_F32 = 0,
  TP_TYPE_F16 = 1,
  TP_TYPE_Q4_0 = 2,
  TP_TYPE_Q4_1 = 3,
  TP_TYPE_Q5_0 = 6,
  TP_TYPE_Q5_1 = 7,
  TP_TYPE_Q8_0 = 8,
  TP_TYPE_Q8_1 = 9,
  TP_TYPE_Q2_K = 10,
  TP_TYPE_Q3_K = 11,
  TP_TYPE_Q4_K = 12,
  TP_TYPE_Q5_K = 13,
  TP_TYPE_Q6_K = 14,
  TP_TYPE_Q8_K = 15,
  TP_TYPE_BF16 = 30,
  TP_TYPE_MXFP4 = 39
} tp_type;

typedef enum tp_schedule {
  TP_SCHEDULE_PIPELINED = 0, /* stage s starts ubatch m+1 as soon as it has handed ubatch m on */
  TP_SCHEDULE_SEQUENTIAL = 1 /* one ubatch in flight at a time (stock layer split), the baseline */
} tp_schedule;

#define TP_MAX_STAGES 64

typedef struct tp_engine_params {
  const char* model_path; /* GGUF file */
  const char* devices;    /* "cpu" | "cpu:0,cpu:1" (one stage per entry) | "cuda" | "cuda:0,cuda:1" */
  int32_t threads;        /* worker threads per stage; 0 = split the machine's cores between stages */
  int32_t ubatch;         /* tokens per ubatch (>= 1) */
  int32_t schedule;       /* tp_schedule */
  int64_t n_ctx;          /* context size in tokens; 0 = the model's training context */
  int32_t n_layer_split;  /* number of entries in layer_split; 0 = even split */
  int32_t layer_split[TP_MAX_STAGES]; /* layers per stage, in stage order */
  int32_t ring_slots;     /* activation slots between consecutive stages; 0 = default */
  /* Cost-shaped ubatches: with ubatch_auto != 0 each prompt is cut into ubatches of about equal predicted
   * cost (attention over the prefix makes late tokens dearer), `ubatch` being the largest ubatch. */
  int32_t ubatch_auto;
  int32_t ubatch_min;        /* smallest ubatch when ubatch_auto; 0 = ubatch / 8 */
  double ubatch_cost_tok;    /* per-layer cost of one token (matmuls); 0 = FLOP-count default */
  double ubatch_cost_pair;   /* per-layer cost of one (query, key) attention pair; 0 = FLOP-count default */
  double ubatch_cost_step;   /* per-layer fixed cost of one ubatch (used with the two above; 0 = none) */
  int32_t n_stage_threads;   /* entries in stage_threads; 0 = `threads` for every stage */
  int32_t stage_threads[TP_MAX_STAGES]; /* worker threads of each cpu stage, in stage order (each >= 1) */
  int32_t n_seq;             /* sequence slots (KV caches that grow with use); 0 or 1 = one sequence */
} tp_engine_params;

typedef struct tp_model_info {
  char architecture[32]; /* general.architecture, e.g. "llama" */
  int64_t n_vocab;
  int64_t n_embd;
  int64_t n_layer;
  int64_t n_head;
  int64_t n_head_kv;
  int64_t head_dim;
  int64_t n_ff;
  int64_t n_ctx_train; /* [arch].context_length */
  int64_t n_ctx;       /* context this engine was created with */
  int64_t n_past;      /* tokens already in the KV cache */
  int64_t n_stages;
  int64_t n_params;    /* weights in the file, in elements */
  int64_t file_bytes;
  int64_t n_expert;      /* mixture of experts: experts per layer (0 = dense FFN) */
  int64_t n_expert_used; /* experts each token is routed to */
  int64_t n_ff_exp;      /* hidden size of one expert */
  int64_t n_swa;         /* sliding window in tokens (0 = none) */
  int64_t n_swa_layers;  /* layers that use the sliding window */
  int32_t attn_sinks;    /* 1 when attention has per-head sink logits */
  char rope_scaling[16]; /* "none", "linear" or "yarn" */
  int32_t rope_sections[4]; /* M-RoPE (qwen2vl): rotary pairs per position id t, h, w, e; all 0 otherwise */
  int64_t next_pos;         /* rope position of the next plain token: n_past, except after tp_engine_prefill_mm
                               with explicit M-RoPE positions */
  int64_t n_seq;            /* sequence slots; n_past and next_pos above are slot 0's */
} tp_model_info;

/* One (stage, ubatch) step of a call's ubatches; times in seconds since the call was submitted. */
typedef struct tp_trace_event {
  int32_t stage;
  int32_t ubatch;
  int64_t n_tokens;
  double t_start;
  double t_end;
} tp_trace_event;

typedef struct tp_engine tp_engine;

/* Message of the last failure on this thread ("" if none). */
TP_API const char* tp_last_error(void);
/* JSON object describing how the library was built (SIMD level, CUDA, version). Static storage. */
TP_API const char* tp_build_info_json(void);

/* The visible CUDA GPUs as JSON: {"gpus": [{"index", "name", "cc", "total_bytes", "free_bytes", "sms"}],
 * "peer": [[bool]]}. TP_ERR_DEVICE (with the CUDA error) when the runtime cannot start, TP_ERR_UNSUPPORTED
 * in a build without CUDA. Release the string with tp_free(). */
TP_API tp_status tp_cuda_devices_json(char** json_out);

TP_API void tp_engine_params_default(tp_engine_params* params);
TP_API tp_status tp_engine_create(const tp_engine_params* params, tp_engine** out);
TP_API void tp_engine_free(tp_engine* engine);
TP_API tp_status tp_engine_info(const tp_engine* engine, tp_model_info* out);

/* Run the prompt tokens[0..n) after the tokens already in the KV cache.
 * logits: caller buffer of logits_len floats; receives the last token's logits (n_vocab floats), or
 * every token's logits (n * n_vocab floats, token-major) when all_logits != 0. May be NULL (no logits).
 * On any error the sequence is left as it was. TP_ERR_IO when the model file was truncated: before the call
 * (restore the file and retry), or during it, in which case the logits are garbage and every later call
 * fails the same way (free the engine and load the model again). */
TP_API tp_status tp_engine_prefill(tp_engine* engine, const int32_t* tokens, int64_t n, int32_t all_logits,
                                   float* logits, int64_t logits_len);
/* Multimodal prefill: like tp_engine_prefill, with embedding rows and explicit rope positions.
 * Entry i is the token tokens[i] when tokens[i] >= 0, else row (-1 - tokens[i]) of embd (host, row-major
 * [n_embd_rows, n_embd] f32, used as it is: no embedding scale); a row out of range is
 * TP_ERR_INVALID_ARGUMENT. embd may be NULL when no entry is negative.
 * pos: NULL, or host int32 [4 * n], section-major: pos[i] = t, pos[n + i] = h (row), pos[2n + i] = w (col),
 * pos[3n + i] = e of entry i, for models with M-RoPE sections (qwen2vl; TP_ERR_INVALID_ARGUMENT otherwise).
 * NULL: entry i takes the rope position next_pos + i (t, h and w; e = 0) and next_pos advances by n; with pos,
 * next_pos becomes max(next_pos, largest t/h/w id + 1). Attention is causal by sequence order either way.
 * Logits and failure semantics as tp_engine_prefill. */
TP_API tp_status tp_engine_prefill_mm(tp_engine* engine, const int32_t* tokens, int64_t n, const float* embd,
                                      int64_t n_embd_rows, const int32_t* pos, int32_t all_logits, float* logits,
                                      int64_t logits_len);
/* Forget the sequence (slot 0): the next prefill starts at position 0. */
TP_API tp_status tp_engine_reset(tp_engine* engine);
/* Stop every running call (any thread): each returns TP_ERR_CANCELLED and leaves its sequences as they were. */
TP_API void tp_engine_cancel(tp_engine* engine);
/* Ubatches at each pipeline stage right now (waiting in the stage's input ring or being computed there):
 * counts[s] for s < min(cap, stages); *n_stages = the number of stages. A snapshot, callable from any thread. */
TP_API tp_status tp_engine_in_flight(const tp_engine* engine, int32_t* counts, int32_t cap, int32_t* n_stages);
/* Stop the running prefills of slot `seq` only (any thread), as tp_engine_cancel does; other slots' calls and
 * decode batches (one step each) go on. TP_ERR_INVALID_ARGUMENT for a slot out of range. */
TP_API tp_status tp_engine_cancel_seq(tp_engine* engine, int32_t seq);
/* From now on no prefill ubatch entering stage 0 carries more than `limit` tokens (any thread; 0: the planned
 * ubatches, as created), including the remaining ubatches of prefills already running: a planned ubatch is cut
 * into pieces of at most `limit`. A server lowers it while answers stream, so a decode step never waits behind
 * more than a short ubatch, and restores it when none does. Logits and KV are unchanged on the CPU backend
 * (its rows do not depend on the ubatch); on CUDA they may differ by f32 rounding, as between ubatch sizes.
 * TP_ERR_INVALID_ARGUMENT for limit < 0. */
TP_API tp_status tp_engine_set_ubatch_limit(tp_engine* engine, int64_t limit);

/* ---- several sequences (n_seq slots) -------------------------------------------------------------------
 * tp_engine_prefill and tp_engine_prefill_mm act on slot 0. Calls on different slots may run at the same time
 * from several threads: their ubatches share the pipeline (a decode goes ahead of queued prompt ubatches) and
 * each slot's logits and KV cache are exactly what it would get alone. A second call on a slot that is busy is
 * TP_ERR_INVALID_ARGUMENT. Every slot holds at most n_ctx tokens; its KV memory grows as it is used and stays
 * after tp_engine_seq_free for the slot's next prompt. A failed or cancelled call leaves its slots as they were.
 *
 * tp_engine_prefill_seq: tp_engine_prefill_mm on slot `seq` (0 <= seq < n_seq). */
TP_API tp_status tp_engine_prefill_seq(tp_engine* engine, int32_t seq, const int32_t* tokens, int64_t n,
                                       const float* embd, int64_t n_embd_rows, const int32_t* pos, int32_t all_logits,
                                       float* logits, int64_t logits_len);
/* One token per listed sequence, appended to each, in one batch through every stage: row i is tokens[i] at the
 * next position (and rope position next_pos) of slot seqs[i], attending to that slot's tokens only. The seqs are
 * distinct (a duplicate is TP_ERR_INVALID_ARGUMENT); a slot already holding n_ctx tokens is
 * TP_ERR_CONTEXT_OVERFLOW. logits: NULL or logits_len >= n * n_vocab floats, row i = seqs[i]'s next-token logits. */
TP_API tp_status tp_engine_decode(tp_engine* engine, int32_t n, const int32_t* seqs, const int32_t* tokens,
                                  float* logits, int64_t logits_len);
/* Forget slot `seq` (its memory is kept for reuse); TP_ERR_INVALID_ARGUMENT while a call runs on it. */
TP_API tp_status tp_engine_seq_free(tp_engine* engine, int32_t seq);
/* Tokens in slot `seq` and the rope position of its next plain token. */
TP_API tp_status tp_engine_seq_info(const tp_engine* engine, int32_t seq, int64_t* n_past, int64_t* next_pos);
/* The last finished call on slot `seq` (a decode counts for each of its slots): its trace (times since the
 * call was submitted; calls that ran interleaved overlap), wall seconds and expert routing, as
 * tp_engine_trace / tp_engine_last_seconds / tp_engine_moe_stats give for slot 0. */
TP_API tp_status tp_engine_seq_trace(const tp_engine* engine, int32_t seq, tp_trace_event* events, int64_t cap,
                                     int64_t* n_events, double* seconds);
TP_API tp_status tp_engine_seq_moe_stats(const tp_engine* engine, int32_t seq, int64_t* steps, int64_t* experts);
/* FNV-1a digest of slot `seq`'s KV cache over its tokens (tp_engine_kv_digest is slot 0's). */
TP_API tp_status tp_engine_seq_kv_digest(const tp_engine* engine, int32_t seq, uint64_t* digest);

/* The equal-cost ubatch cut the engine uses with ubatch_auto (for the simulator and tests): n_layer layers,
 * layer_swa[i] != 0 for sliding-window layers of window n_swa, coefficients per layer (cost_tok > 0,
 * cost_pair >= 0, cost_step >= 0), n_stages pipeline stages. Writes the M + 1 boundaries (0 .. n) to
 * bounds (capacity cap) and M + 1 to *n_bounds. */
TP_API tp_status tp_plan_ubatches(const int8_t* layer_swa, int64_t n_layer, int64_t n_swa, double cost_tok,
                                  double cost_pair, double cost_step, int64_t n_stages, int64_t n, int64_t pos0,
                                  int64_t umin, int64_t umax, int64_t* bounds, int64_t cap, int64_t* n_bounds);
/* The FLOP-count per-ubatch step cost of one layer that goes with tp_engine_cost_defaults. */
TP_API tp_status tp_engine_cost_step_default(const tp_engine* engine, double* cost_step);

/* Per-layer attention kind: swa[i] = 1 when layer i uses the sliding window (cap entries written). */
TP_API tp_status tp_engine_layer_swa(const tp_engine* engine, int8_t* swa, int64_t cap);

/* The FLOP-count cost coefficients of one decoder layer that ubatch_auto uses when none are given (the ratio
 * is what matters: attention FLOPs are weighted as dearer than int8 matmul FLOPs; see pipeline/plan.h). */
TP_API tp_status tp_engine_cost_defaults(const tp_engine* engine, double* cost_tok, double* cost_pair);

/* Prefix cache. save_state writes the sequence's KV cache (every stage, positions 0..n_past) and the model's
 * identity (file size, hash of the GGUF header/metadata/tensor table, n_layer, kv_dim, layer split, n_past,
 * next_pos, KV element type) to `path`. load_state replaces the engine's sequence with a saved one, so the next
 * prefill continues after its tokens; a state of another model or layer split, or a corrupt or truncated
 * file, is an error (TP_ERR_INVALID_ARGUMENT / TP_ERR_FORMAT) that leaves the sequence as it was. */
TP_API tp_status tp_engine_save_state(tp_engine* engine, const char* path);
TP_API tp_status tp_engine_load_state(tp_engine* engine, const char* path);

/* FNV-1a digest of the KV cache contents of every stage over the tokens in the sequence (tests compare
 * schedules with it). */
TP_API tp_status tp_engine_kv_digest(const tp_engine* engine, uint64_t* digest);

/* Testing aid: the next prefills fail with TP_ERR_INTERNAL when they reach `layer` (-1 turns it off), to
 * check that a stage's error stops every stage and reaches the caller. */
TP_API tp_status tp_engine_inject_fault(tp_engine* engine, int64_t layer);

/* Testing aids: faults armed process-wide (csrc/testing/fault_inject.h); tests that arm one run one at a time.
 * tp_test_fail_alloc: the n-th allocation of `kind` from now on (1 = the next one) fails as a real failed
 * allocation would (std::bad_alloc inside the library); n = 0 disarms. Covers the CPU backend: activation
 * buffers (scratch, ring slots, logits, vision buffers) and each layer's K or V buffer of a KV cache growth. */
typedef enum tp_alloc_kind {
  TP_ALLOC_ACTIVATION = 0,
  TP_ALLOC_KV_CACHE = 1
} tp_alloc_kind;
TP_API tp_status tp_test_fail_alloc(int32_t kind, int64_t n);
/* The next GgufFile::check_intact of the file opened as `path` (at the start of a prefill or vision encode)
 * truncates that file to `size` bytes once its check has passed: a truncation during the run that follows.
 * path = NULL disarms. */
TP_API tp_status tp_test_truncate_after_check(const char* path, int64_t size);

/* Self-checking stress run of the stage-to-stage ring (see csrc/pipeline/ring_stress.h); *errors = 0
 * when every item arrived once, in order, intact. */
TP_API tp_status tp_ring_stress(int32_t capacity, int64_t n_items, int64_t max_delay_ns, uint64_t seed,
                                int64_t* errors);

/* Routing of the last prefill on slot 0 (mixture-of-experts models): *steps = (layer, ubatch) router steps run,
 * *experts = the sum over those steps of the distinct experts the ubatch's tokens were routed to (so
 * experts / steps = experts one ubatch touches per layer). Both are -1 when a stage's backend does not
 * count them (cuda) and 0 for a dense model. */
TP_API tp_status tp_engine_moe_stats(const tp_engine* engine, int64_t* steps, int64_t* experts);

/* Timing of the last prefill on slot 0: wall seconds and per-(stage, ubatch) trace. */
TP_API tp_status tp_engine_last_seconds(const tp_engine* engine, double* seconds);
TP_API tp_status tp_engine_trace(const tp_engine* engine, tp_trace_event* events, int64_t cap, int64_t* n_events);

/* Read a GGUF file's header, metadata and tensor table as one JSON document (no weights are read).
 * The string is owned by the caller: release it with tp_free(). */
TP_API tp_status tp_gguf_describe_json(const char* path, char** json_out);
TP_API void tp_free(void* p);

/* Block formats, for tests and the model writer. Sizes: bytes per block and elements per block. */
TP_API tp_status tp_type_traits(int32_t type, int64_t* block_elems, int64_t* block_bytes, const char** name);
/* Reference quantizer: n_rows rows of n_per_row floats into dst (n_rows * row_bytes). */
TP_API tp_status tp_quantize(int32_t type, const float* src, int64_t n_rows, int64_t n_per_row, void* dst,
                             int64_t dst_bytes);
/* Dequantize n elements (a whole number of blocks). */
TP_API tp_status tp_dequantize(int32_t type, const void* src, int64_t n, float* dst);
/* y[t][r] = sum_k W[r][k] * x[t][k] with W in `type` (rows x k), x and y f32, on the CPU backend. */
TP_API tp_status tp_cpu_matmul(int32_t type, const void* w, int64_t rows, int64_t k, const float* x, int64_t n_tok,
                               float* y, int32_t threads);

/* ---- vision encoder (Qwen2.5-VL mmproj, projector "qwen2.5vl_merger"; csrc/model/vision.h) ----------------
 * An image is normalized f32 pixels [3, height, width] (channel-major: (pixel / 255 - image_mean[c]) /
 * image_std[c]), height and width positive multiples of patch_size * merge_size (28), at most 9408 px a side
 * and 65536 patches. The output has one row of proj_dim floats (the text model's n_embd) per merged 2x2
 * patch, in raster order over the merged grid: (height / 28) * (width / 28) rows. */
typedef struct tp_vision tp_vision;

typedef struct tp_vision_info {
  char projector[32];        /* clip.projector_type */
  int64_t n_embd, n_layer, n_head, head_dim, n_ff;
  int64_t patch_size, merge_size;
  int64_t proj_dim;          /* output width = the text model's n_embd */
  int64_t merger_dim;        /* hidden width of the merger MLP */
  int64_t window_px;         /* window attention edge in pixels (112) */
  int64_t n_wa_pattern;      /* layer il attends to the whole image when (il + 1) % n_wa_pattern == 0; 0: all */
  int64_t image_size;
  int64_t min_pixels, max_pixels;  /* the file's preprocessing bounds; 0 when it does not say */
  float image_mean[3], image_std[3];
} tp_vision_info;

/* device: "cpu", "cpu:N", "cuda" or "cuda:N"; n_threads <= 0: one per core (cpu only). A handle runs one
 * encode at a time (calls on one handle must not overlap); separate handles are independent. */
TP_API tp_status tp_vision_create(const char* mmproj_path, const char* device, int32_t n_threads, tp_vision** out);
TP_API tp_status tp_vision_info_get(const tp_vision* vision, tp_vision_info* out);
/* out_len must be (height / 28) * (width / 28) * proj_dim; *seconds (may be null) = wall time of the encode. */
TP_API tp_status tp_vision_encode(tp_vision* vision, const float* pixels, int64_t height, int64_t width, float* out,
                                  int64_t out_len, double* seconds);
TP_API void tp_vision_free(tp_vision* vision);

#ifdef __cplusplus
}
#endif

#endif /* TURBOPREFILL_H */
