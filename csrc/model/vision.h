// vision.h — the Qwen2.5-VL vision encoder (mmproj GGUF, projector "qwen2.5vl_merger"): config, weights and
// the forward pass of one image, written against Ops like the decoder (DESIGN §8).
//
// Layouts: an image is normalized f32 pixels [3, H, W] (channel-major), H and W multiples of 28 (patch 14 ×
// merge 2). Patches are 14×14; a merged patch is a 2×2 group of patches; the output has one row of proj_dim
// floats per merged patch, in raster order over the merged grid (H/28 rows of W/28).
//
// Inside, the patch sequence is llama.cpp's (tools/mtmd/models/qwen2vl.cpp): each merged patch's four
// patches consecutive ((dy,dx) = (0,0), (0,1), (1,0), (1,1)), and with window attention (n_wa_pattern > 0)
// the merged patches permuted so that each 112-px window (4×4 merged patches, smaller at the right and bottom
// edges) is contiguous, windows in raster order. Layer il attends within windows unless (il + 1) %
// n_wa_pattern == 0. The merger reads 4 consecutive rows as one, so it needs no gather; the output rows are
// put back into raster order on the host.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/ops.h"
#include "gguf/gguf.h"
#include "model/weights.h"

namespace tp {

struct ClipConfig {
  std::string projector;       // clip.projector_type: "qwen2.5vl_merger"
  int64_t n_embd = 0;          // clip.vision.embedding_length
  int64_t n_layer = 0;         // clip.vision.block_count
  int64_t n_head = 0;          // clip.vision.attention.head_count
  int64_t head_dim = 0;        // n_embd / n_head
  int64_t n_ff = 0;            // clip.vision.feed_forward_length
  int64_t patch_size = 14;     // clip.vision.patch_size
  int64_t merge_size = 2;      // clip.vision.spatial_merge_size (only 2 is supported, as in llama.cpp's graph)
  int64_t proj_dim = 0;        // clip.vision.projection_dim: the text model's n_embd
  int64_t merger_dim = 0;      // rows of mm.0 (4 · n_embd in Qwen2.5-VL)
  int64_t window_px = 112;     // llama.cpp's fixed window for this projector (it reads no key for it)
  int64_t n_wa_pattern = 0;    // clip.vision.n_wa_pattern; 0: every layer full attention
  int64_t image_size = 0;      // clip.vision.image_size (informational)
  int64_t min_pixels = 0, max_pixels = 0;  // clip.vision.image_{min,max}_pixels, 0 when absent
  float eps = 1e-6f;           // clip.vision.attention.layer_norm_epsilon
  float image_mean[3] = {0, 0, 0}, image_std[3] = {1, 1, 1};

  int64_t unit() const { return patch_size * merge_size; }  // H and W are multiples of this (28)
  bool full_attention(int64_t il) const { return n_wa_pattern == 0 || (il + 1) % n_wa_pattern == 0; }
};

struct ClipLayer {
  Tensor ln1, ln2;          // [n_embd] f32 RMSNorm weights
  Tensor wq, wk, wv;        // [n_embd, n_embd] f32 / f16 / q8_0 ...
  Tensor bq, bk, bv;        // [n_embd] f32
  Tensor wo;                // [n_embd, n_embd]
  Tensor bo;                // [n_embd] f32
  Tensor gate, up;          // [n_embd, n_ff]
  Tensor bgate, bup;        // [n_ff] f32
  Tensor down;              // [n_ff, n_embd]
  Tensor bdown;             // [n_embd] f32
};

struct ClipWeights {
  Tensor patch0, patch1;    // [14, 14, 3, n_embd] f32 / f16, viewed as [588, n_embd]: the conv3d's two frames
  std::vector<ClipLayer> layers;
  Tensor post_ln;           // [n_embd] f32
  Tensor mm0;               // [4 n_embd, merger_dim]
  Tensor mm0_b;             // [merger_dim] f32
  Tensor mm2;               // [merger_dim, proj_dim]
  Tensor mm2_b;             // [proj_dim] f32
};

// Reads and checks the mmproj's metadata and tensors. Throws tp::Error: TP_ERR_UNSUPPORTED for another
// projector or an unsupported weight type, TP_ERR_FORMAT for a missing or inconsistent key or tensor, each
// naming the key or tensor and the values found.
ClipConfig load_clip_config(const GgufFile& f);
ClipWeights load_clip_weights(const GgufFile& f, const ClipConfig& c);

// Largest image side and patch count encode() accepts: 9408 px a side (336 merged patches) and 65536 patches
// (a 3584×3584 image; llama.cpp's Qwen2.5-VL limit is 16384 merged = 65536 patches too).
constexpr int64_t kVisionMaxSide = 9408;
constexpr int64_t kVisionMaxPatches = 65536;

class VisionModel {
 public:
  // Owns the file, the weights' views into it and the backend; device: "cpu", "cpu:N", "cuda", "cuda:N".
  VisionModel(const std::string& mmproj_path, const std::string& device, int n_threads);
  ~VisionModel();

  const ClipConfig& config() const { return cfg_; }
  // Merged patches of an h × w image.
  int64_t n_merged(int64_t h, int64_t w) const { return (h / cfg_.unit()) * (w / cfg_.unit()); }
  // Throws TP_ERR_INVALID_ARGUMENT, saying why, unless h and w are positive multiples of 28 within the bounds.
  void check_image(int64_t h, int64_t w) const;
  // pixels: host [3, h, w]; out: host [n_merged(h, w), proj_dim]. Checks the size (check_image). Returns wall
  // seconds.
  double encode(const float* pixels, int64_t h, int64_t w, float* out);

 private:
  void reserve(int64_t need);  // buffers for at least `need` patches

  std::unique_ptr<GgufFile> file_;
  ClipConfig cfg_;
  ClipWeights w_;
  std::unique_ptr<Ops> ops_;
  // Backend buffers for up to cap_ patches (grown, never shrunk: Ops frees buffers only with itself).
  int64_t cap_ = 0;
  float *x_ = nullptr, *h_ = nullptr, *q_ = nullptr, *k_ = nullptr, *v_ = nullptr, *a_ = nullptr;
  float *g_ = nullptr, *u_ = nullptr, *m_ = nullptr, *y_ = nullptr;
  int32_t *pos_ = nullptr, *seg_win_ = nullptr, *seg_full_ = nullptr;
};

}  // namespace tp
