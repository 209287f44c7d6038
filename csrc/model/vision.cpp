// vision.cpp — Qwen2.5-VL vision encoder: mmproj loading and checks, and the forward pass of one image.
//
// Key and tensor names are llama.cpp's (tools/mtmd/clip-impl.h; gguf-py's Keys.ClipVision, MODEL_TENSOR.V_*).
// The forward pass is llama.cpp's graph (tools/mtmd/models/qwen2vl.cpp) on Ops:
//   patch embedding: both conv3d frames applied to the same still image and summed (two matmuls over the
//     flattened [3, 14, 14] patches, the conv weight's element order), no bias;
//   per block: x += o(attn(rope(q), rope(k), v)) over h = RMSNorm(x), with biases and 2-D vision rope
//     (row, col, row, col positions; sections head_dim/4 each, base 10000); x += down(silu(gate h) · up h);
//   post RMSNorm; merger: 4 consecutive patch rows as one → mm.0 → GELU (tanh form, ggml_gelu) → mm.2.
#include "model/vision.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>

#include "common.h"
#if defined(TP_WITH_CUDA)
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/device.h"
#endif

namespace tp {

namespace {

constexpr const char* kProjector = "qwen2.5vl_merger";

int64_t positive_key(const GgufFile& f, const std::string& key, int64_t lo, int64_t hi) {
  const int64_t v = f.get_int(key);
  if (v < lo || v > hi)
    fail(TP_ERR_FORMAT, "%s: key '%s' is %lld, expected %lld .. %lld", f.path().c_str(), key.c_str(), (long long)v,
         (long long)lo, (long long)hi);
  return v;
}

// A BOOL key (absent: false).
bool flag_key(const GgufFile& f, const std::string& key) {
  const GgufValue* v = f.find(key);
  if (!v) return false;
  if (v->type != GgufValueType::BOOL)
    fail(TP_ERR_FORMAT, "%s: key '%s' must be a BOOL", f.path().c_str(), key.c_str());
  return v->i != 0;
}

void float3_key(const GgufFile& f, const std::string& key, float* out) {
  const GgufValue* v = f.find(key);
  if (!v) fail(TP_ERR_FORMAT, "%s: missing required key '%s'", f.path().c_str(), key.c_str());
  if (!v->is_array() || v->af.size() != 3)
    fail(TP_ERR_FORMAT, "%s: key '%s' must be an array of 3 floats (one per RGB channel)", f.path().c_str(),
         key.c_str());
  for (int i = 0; i < 3; ++i) out[i] = float(v->af[size_t(i)]);
}

struct ClipLoader {
  const GgufFile& f;

  // The tensor viewed as [cols, rows] (rows = ne1·ne2·ne3); `shape` says the expected GGUF shape in errors.
  Tensor get(const std::string& name, int64_t cols, int64_t rows, const std::string& shape) const {
    const GgufTensor* t = f.find_tensor(name);
    if (!t) fail(TP_ERR_FORMAT, "%s: missing tensor '%s' (expected shape %s)", f.path().c_str(), name.c_str(),
                 shape.c_str());
    const TypeTraits tt = type_traits(t->type);
    if (!tt.supported)
      fail(TP_ERR_UNSUPPORTED, "%s: unsupported tensor type %s in tensor '%s'", f.path().c_str(), tt.name,
           name.c_str());
    if (t->n_elements() != cols * rows || cols % tt.block_elems != 0)
      fail(TP_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld] of %s, expected %s",
           f.path().c_str(), name.c_str(), (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2],
           (long long)t->ne[3], tt.name, shape.c_str());
    Tensor v;
    v.name = t->name.c_str();
    v.type = GgmlType(t->type);
    v.cols = cols;
    v.rows = rows;
    v.row_bytes = row_bytes(tt, cols);
    v.data = t->data;
    return v;
  }

  Tensor matrix(const std::string& name, int64_t cols, int64_t rows) const {
    const GgufTensor* t = f.find_tensor(name);
    if (t && (t->ne[0] != cols || t->ne[1] != rows || t->ne[2] != 1 || t->ne[3] != 1))
      fail(TP_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld]",
           f.path().c_str(), name.c_str(), (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2],
           (long long)t->ne[3], (long long)cols, (long long)rows);
    return get(name, cols, rows, fmt("[%lld, %lld]", (long long)cols, (long long)rows));
  }

  // Norm weights and biases are applied element-wise by the backends, which read them as f32.
  Tensor vec_f32(const std::string& name, int64_t n) const {
    const Tensor v = get(name, n, 1, fmt("[%lld]", (long long)n));
    if (v.type != GgmlType::F32)
      fail(TP_ERR_UNSUPPORTED, "%s: tensor '%s' has type %s; norm weights and biases must be F32", f.path().c_str(),
           name.c_str(), type_traits(int32_t(v.type)).name);
    return v;
  }
};

}  // namespace

ClipConfig load_clip_config(const GgufFile& f) {
  ClipConfig c;
  const std::string arch = f.get_string("general.architecture");
  if (arch != "clip")
    fail(TP_ERR_UNSUPPORTED, "%s: general.architecture is '%s', expected 'clip' (a multimodal projector, mmproj)",
         f.path().c_str(), arch.c_str());
  c.projector = f.find("clip.vision.projector_type") ? f.get_string("clip.vision.projector_type")
                                                     : f.get_string("clip.projector_type");
  if (c.projector != kProjector)
    fail(TP_ERR_UNSUPPORTED, "%s: clip.projector_type is '%s'; only '%s' (Qwen2.5-VL) is supported",
         f.path().c_str(), c.projector.c_str(), kProjector);
  if (!flag_key(f, "clip.has_vision_encoder"))
    fail(TP_ERR_FORMAT, "%s: clip.has_vision_encoder is missing or false", f.path().c_str());
  if (!flag_key(f, "clip.use_silu") || flag_key(f, "clip.use_gelu"))
    fail(TP_ERR_UNSUPPORTED, "%s: clip.use_silu is not set: the vision FFN would not be SwiGLU (Qwen2.5-VL's)",
         f.path().c_str());

  const std::string v = "clip.vision.";
  c.n_embd = positive_key(f, v + "embedding_length", 1, 1 << 16);
  c.n_layer = positive_key(f, v + "block_count", 1, 1024);
  c.n_head = positive_key(f, v + "attention.head_count", 1, 1024);
  c.n_ff = positive_key(f, v + "feed_forward_length", 1, 1 << 18);
  c.proj_dim = positive_key(f, v + "projection_dim", 1, 1 << 18);
  c.patch_size = positive_key(f, v + "patch_size", 1, 64);
  c.image_size = positive_key(f, v + "image_size", 1, 1 << 16);
  c.n_wa_pattern = positive_key(f, v + "n_wa_pattern", 0, 1024);
  c.merge_size = f.get_int_or(v + "spatial_merge_size", 2);
  c.min_pixels = f.get_int_or(v + "image_min_pixels", 0);
  c.max_pixels = f.get_int_or(v + "image_max_pixels", 0);
  c.eps = float(f.get_float_or(v + "attention.layer_norm_epsilon", -1.0));
  float3_key(f, v + "image_mean", c.image_mean);
  float3_key(f, v + "image_std", c.image_std);

  if (!(c.eps > 0.0f) || c.eps > 0.1f)
    fail(TP_ERR_FORMAT, "%s: key '%sattention.layer_norm_epsilon' is missing or not in (0, 0.1]", f.path().c_str(),
         v.c_str());
  if (c.merge_size != 2)
    fail(TP_ERR_UNSUPPORTED, "%s: %sspatial_merge_size is %lld; the Qwen2.5-VL merger groups 2x2 patches",
         f.path().c_str(), v.c_str(), (long long)c.merge_size);
  if (c.n_embd % c.n_head)
    fail(TP_ERR_FORMAT, "%s: embedding_length %lld is not a multiple of attention.head_count %lld", f.path().c_str(),
         (long long)c.n_embd, (long long)c.n_head);
  c.head_dim = c.n_embd / c.n_head;
  if (f.get_int_or(v + "attention.head_count_kv", c.n_head) != c.n_head ||
      f.get_int_or(v + "attention.head_dim", c.head_dim) != c.head_dim)
    fail(TP_ERR_FORMAT, "%s: %sattention.head_count_kv / head_dim disagree with head_count %lld and head_dim %lld "
         "(the vision encoder has plain multi-head attention)", f.path().c_str(), v.c_str(), (long long)c.n_head,
         (long long)c.head_dim);
  if (c.head_dim % 4)
    fail(TP_ERR_UNSUPPORTED, "%s: head_dim %lld is not a multiple of 4 (the 2-D vision rope's four sections)",
         f.path().c_str(), (long long)c.head_dim);
  if (c.window_px / c.unit() < 1)
    fail(TP_ERR_UNSUPPORTED, "%s: patch_size %lld: a %lld px window holds no merged patch", f.path().c_str(),
         (long long)c.patch_size, (long long)c.window_px);
  if (c.min_pixels < 0 || c.max_pixels < 0 || (c.max_pixels > 0 && c.max_pixels < c.min_pixels))
    fail(TP_ERR_FORMAT, "%s: image_min_pixels %lld / image_max_pixels %lld are inconsistent", f.path().c_str(),
         (long long)c.min_pixels, (long long)c.max_pixels);
  return c;
}

ClipWeights load_clip_weights(const GgufFile& f, const ClipConfig& c) {
  ClipLoader L{f};
  ClipWeights w;
  const int64_t pp = c.patch_size * c.patch_size, d = c.n_embd;
  const std::string pshape = fmt("[%lld, %lld, 3, %lld] f32/f16/bf16", (long long)c.patch_size,
                                 (long long)c.patch_size, (long long)d);
  for (int i = 0; i < 2; ++i) {
    const std::string name = i == 0 ? "v.patch_embd.weight" : "v.patch_embd.weight.1";
    const GgufTensor* t = f.find_tensor(name);
    if (t && (t->ne[0] != c.patch_size || t->ne[1] != c.patch_size || t->ne[2] != 3 || t->ne[3] != d))
      fail(TP_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected %s", f.path().c_str(),
           name.c_str(), (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3],
           pshape.c_str());
    if (t && t->type != int32_t(GgmlType::F32) && t->type != int32_t(GgmlType::F16) &&
        t->type != int32_t(GgmlType::BF16))
      fail(TP_ERR_UNSUPPORTED, "%s: tensor '%s' has type %s; the patch embedding must be F32, F16 or BF16",
           f.path().c_str(), name.c_str(), type_traits(t->type).name);
    (i == 0 ? w.patch0 : w.patch1) = L.get(name, 3 * pp, d, pshape);
  }
  if (f.find_tensor("v.patch_embd.bias"))
    fail(TP_ERR_UNSUPPORTED, "%s: tensor 'v.patch_embd.bias' is present; Qwen2.5-VL's patch embedding has none",
         f.path().c_str());

  w.layers.resize(size_t(c.n_layer));
  for (int64_t il = 0; il < c.n_layer; ++il) {
    ClipLayer& l = w.layers[size_t(il)];
    const std::string b = "v.blk." + std::to_string(il) + ".";
    l.ln1 = L.vec_f32(b + "ln1.weight", d);
    l.ln2 = L.vec_f32(b + "ln2.weight", d);
    l.wq = L.matrix(b + "attn_q.weight", d, d);
    l.wk = L.matrix(b + "attn_k.weight", d, d);
    l.wv = L.matrix(b + "attn_v.weight", d, d);
    l.bq = L.vec_f32(b + "attn_q.bias", d);
    l.bk = L.vec_f32(b + "attn_k.bias", d);
    l.bv = L.vec_f32(b + "attn_v.bias", d);
    l.wo = L.matrix(b + "attn_out.weight", d, d);
    l.bo = L.vec_f32(b + "attn_out.bias", d);
    l.gate = L.matrix(b + "ffn_gate.weight", d, c.n_ff);
    l.bgate = L.vec_f32(b + "ffn_gate.bias", c.n_ff);
    l.up = L.matrix(b + "ffn_up.weight", d, c.n_ff);
    l.bup = L.vec_f32(b + "ffn_up.bias", c.n_ff);
    l.down = L.matrix(b + "ffn_down.weight", c.n_ff, d);
    l.bdown = L.vec_f32(b + "ffn_down.bias", d);
  }
  w.post_ln = L.vec_f32("v.post_ln.weight", d);
  const GgufTensor* mm0 = f.find_tensor("mm.0.weight");
  if (!mm0) fail(TP_ERR_FORMAT, "%s: missing tensor 'mm.0.weight' (expected shape [%lld, n])", f.path().c_str(),
                 (long long)(4 * d));
  const int64_t md = mm0->ne[1];
  w.mm0 = L.matrix("mm.0.weight", 4 * d, md);
  w.mm0_b = L.vec_f32("mm.0.bias", md);
  w.mm2 = L.matrix("mm.2.weight", md, c.proj_dim);
  w.mm2_b = L.vec_f32("mm.2.bias", c.proj_dim);
  return w;
}

VisionModel::VisionModel(const std::string& mmproj_path, const std::string& device, int n_threads) {
  file_ = std::make_unique<GgufFile>(mmproj_path);
  cfg_ = load_clip_config(*file_);
  w_ = load_clip_weights(*file_, cfg_);
  cfg_.merger_dim = w_.mm0.rows;
  file_->check_intact();
  const auto number_after = [&](size_t at) {
    const std::string num = device.substr(at);
    if (num.empty() || num.size() > 4 || num.find_first_not_of("0123456789") != std::string::npos)
      fail(TP_ERR_INVALID_ARGUMENT, "bad device '%s': expected cpu, cpu:N, cuda or cuda:N", device.c_str());
    return std::stoi(num);
  };
  if (device == "cpu" || device.rfind("cpu:", 0) == 0) {
    if (device != "cpu") number_after(4);
    const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
    ops_ = make_cpu_ops(n_threads > 0 ? n_threads : hw);
  } else if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
#if defined(TP_WITH_CUDA)
    const int dev = device == "cuda" ? 0 : number_after(5);
    const int n_gpu = int(cuda::list_devices().size());
    if (dev >= n_gpu)
      fail(TP_ERR_DEVICE, "device '%s': %d CUDA GPU(s) are visible", device.c_str(), n_gpu);
    if (cfg_.head_dim > kTpAttnSegMaxHeadDim)
      fail(TP_ERR_UNSUPPORTED, "%s: head_dim %lld: the CUDA vision attention handles head_dim <= %lld; use cpu",
           mmproj_path.c_str(), (long long)cfg_.head_dim, (long long)kTpAttnSegMaxHeadDim);
    ops_ = make_cuda_ops(dev, 4096);
#else
    fail(TP_ERR_DEVICE, "device '%s': this build of turboprefill has no CUDA backend; use device=\"cpu\"",
         device.c_str());
#endif
  } else {
    fail(TP_ERR_INVALID_ARGUMENT, "bad device '%s': expected cpu, cpu:N, cuda or cuda:N", device.c_str());
  }
  for (const Tensor* t : {&w_.patch0, &w_.patch1, &w_.post_ln, &w_.mm0, &w_.mm0_b, &w_.mm2, &w_.mm2_b})
    ops_->upload(*t);
  for (const ClipLayer& l : w_.layers)
    for (const Tensor* t : {&l.ln1, &l.ln2, &l.wq, &l.wk, &l.wv, &l.bq, &l.bk, &l.bv, &l.wo, &l.bo, &l.gate,
                            &l.bgate, &l.up, &l.bup, &l.down, &l.bdown})
      ops_->upload(*t);
}

VisionModel::~VisionModel() = default;

void VisionModel::reserve(int64_t need) {
  if (need <= cap_) return;
  // Geometric growth (multiples of 4 patches, capped at the largest image): the outgrown buffers stay with the
  // Ops until it is freed, so a run of ever larger images holds at most ~3x the largest one's buffers.
  const int64_t n = std::min(kVisionMaxPatches, std::max(need, (cap_ + cap_ / 2 + 3) / 4 * 4));
  const ClipConfig& c = cfg_;
  const int64_t pix = 3 * c.patch_size * c.patch_size;
  x_ = ops_->alloc(n * c.n_embd);
  h_ = ops_->alloc(n * std::max(c.n_embd, pix));
  q_ = ops_->alloc(n * c.n_embd);
  k_ = ops_->alloc(n * c.n_embd);
  v_ = ops_->alloc(n * c.n_embd);
  a_ = ops_->alloc(n * c.n_embd);
  g_ = ops_->alloc(n * c.n_ff);
  u_ = ops_->alloc(n * c.n_ff);
  m_ = ops_->alloc(n / 4 * c.merger_dim);
  y_ = ops_->alloc(n / 4 * c.proj_dim);
  pos_ = ops_->alloc_i32(4 * n);
  seg_win_ = ops_->alloc_i32(n / 4 + 1);  // at most one window per merged patch
  seg_full_ = ops_->alloc_i32(2);
  cap_ = n;
}

void VisionModel::check_image(int64_t h, int64_t w) const {
  const ClipConfig& c = cfg_;
  const int64_t u = c.unit(), ps = c.patch_size;
  if (h <= 0 || w <= 0 || h % u || w % u)
    fail(TP_ERR_INVALID_ARGUMENT, "vision encode: image %lld x %lld (height x width) must be positive multiples of "
         "%lld (patch %lld x merge %lld); resize or pad it", (long long)h, (long long)w, (long long)u, (long long)ps,
         (long long)c.merge_size);
  const int64_t n = (h / ps) * (w / ps);
  if (h > kVisionMaxSide || w > kVisionMaxSide || n > kVisionMaxPatches)
    fail(TP_ERR_INVALID_ARGUMENT, "vision encode: image %lld x %lld is too large (at most %lld px a side and %lld "
         "patches of %lld px; this one has %lld)", (long long)h, (long long)w, (long long)kVisionMaxSide,
         (long long)kVisionMaxPatches, (long long)ps, (long long)n);
}

double VisionModel::encode(const float* pixels, int64_t h, int64_t w, float* out) {
  const auto t0 = std::chrono::steady_clock::now();
  check_image(h, w);
  const ClipConfig& c = cfg_;
  const int64_t u = c.unit(), ps = c.patch_size, gh = h / ps, gw = w / ps, n = gh * gw;  // patch grid
  file_->check_intact();
  const int64_t mh = gh / 2, mw = gw / 2, n_m = mh * mw;  // merged grid

  // Window order: inv[dst] = the merged patch (raster index) at sequence slot dst; seg = window bounds in
  // patches. Without window attention the sequence is the raster order and the one segment is everything.
  std::vector<int32_t> inv(static_cast<size_t>(n_m)), seg{0};
  const bool windows = c.n_wa_pattern > 0;
  if (windows) {
    const int64_t gwin = c.window_px / u;
    int64_t dst = 0;
    for (int64_t y = 0; y < mh; y += gwin)
      for (int64_t x = 0; x < mw; x += gwin) {
        for (int64_t dy = 0; dy < std::min(gwin, mh - y); ++dy)
          for (int64_t dx = 0; dx < std::min(gwin, mw - x); ++dx) inv[size_t(dst++)] = int32_t((y + dy) * mw + x + dx);
        seg.push_back(int32_t(4 * dst));
      }
  } else {
    for (int64_t i = 0; i < n_m; ++i) inv[size_t(i)] = int32_t(i);
    seg.push_back(int32_t(n));
  }

  // Patches in sequence order, each [3, ps, ps] flattened like the conv weight; positions (row, col, row, col).
  const int64_t pix = 3 * ps * ps;
  std::vector<float> patches(static_cast<size_t>(n * pix));
  std::vector<int32_t> pos(static_cast<size_t>(4 * n));
  for (int64_t dst = 0; dst < n_m; ++dst) {
    const int64_t my = inv[size_t(dst)] / mw, mx = inv[size_t(dst)] % mw;
    for (int64_t sub = 0; sub < 4; ++sub) {
      const int64_t row = 4 * dst + sub, py = 2 * my + sub / 2, px = 2 * mx + sub % 2;
      float* o = patches.data() + row * pix;
      for (int64_t ch = 0; ch < 3; ++ch)
        for (int64_t ky = 0; ky < ps; ++ky) {
          const float* src = pixels + (ch * h + py * ps + ky) * w + px * ps;
          std::copy(src, src + ps, o + (ch * ps + ky) * ps);
        }
      pos[size_t(row)] = pos[size_t(2 * n + row)] = int32_t(py);
      pos[size_t(n + row)] = pos[size_t(3 * n + row)] = int32_t(px);
    }
  }

  reserve(n);
  Ops& o = *ops_;
  const int32_t full[2] = {0, int32_t(n)};
  o.from_host(h_, patches.data(), n * pix);
  o.from_host_i32(pos_, pos.data(), 4 * n);
  o.from_host_i32(seg_win_, seg.data(), int64_t(seg.size()));
  o.from_host_i32(seg_full_, full, 2);
  const int64_t n_win = int64_t(seg.size()) - 1;

  // Patch embedding: both temporal frames of the conv3d see the same image.
  o.matmul(x_, w_.patch0, h_, n);
  o.matmul(q_, w_.patch1, h_, n);
  o.add(x_, x_, q_, n * c.n_embd);

  RopeParams rp;
  rp.mode = RopeMode::Vision;
  rp.n_rot = c.head_dim / 2;
  rp.base = 10000.0f;
  for (int s = 0; s < 4; ++s) rp.sections[s] = int(c.head_dim / 4);
  AttnParams ap;
  ap.n_head = ap.n_head_kv = c.n_head;
  ap.head_dim = c.head_dim;
  ap.kq_scale = 1.0f / std::sqrt(float(c.head_dim));

  const int64_t d = c.n_embd;
  for (int64_t il = 0; il < c.n_layer; ++il) {
    const ClipLayer& l = w_.layers[size_t(il)];
    o.rms_norm(h_, x_, l.ln1, n, d, c.eps);
    o.matmul(q_, l.wq, h_, n);
    o.add_bias(q_, l.bq, n);
    o.matmul(k_, l.wk, h_, n);
    o.add_bias(k_, l.bk, n);
    o.matmul(v_, l.wv, h_, n);
    o.add_bias(v_, l.bv, n);
    o.rope(q_, n, c.n_head, c.head_dim, 0, rp, pos_);
    o.rope(k_, n, c.n_head, c.head_dim, 0, rp, pos_);
    if (c.full_attention(il))
      o.attention_seg(a_, q_, k_, v_, n, ap, seg_full_, 1);
    else
      o.attention_seg(a_, q_, k_, v_, n, ap, seg_win_, n_win);
    o.matmul(h_, l.wo, a_, n);
    o.add_bias(h_, l.bo, n);
    o.add(x_, x_, h_, n * d);

    o.rms_norm(h_, x_, l.ln2, n, d, c.eps);
    o.matmul(g_, l.gate, h_, n);
    o.add_bias(g_, l.bgate, n);
    o.matmul(u_, l.up, h_, n);
    o.add_bias(u_, l.bup, n);
    o.glu(g_, g_, u_, n * c.n_ff, Activation::Silu);
    o.matmul(h_, l.down, g_, n);
    o.add_bias(h_, l.bdown, n);
    o.add(x_, x_, h_, n * d);
  }
  o.rms_norm(h_, x_, w_.post_ln, n, d, c.eps);

  // Merger: the 4 patches of a merged patch are consecutive rows, i.e. one row of 4·n_embd.
  o.matmul(m_, w_.mm0, h_, n_m);
  o.add_bias(m_, w_.mm0_b, n_m);
  o.unary(m_, m_, n_m * c.merger_dim, Activation::GeluTanh);
  o.matmul(y_, w_.mm2, m_, n_m);
  o.add_bias(y_, w_.mm2_b, n_m);

  std::vector<float> seq(static_cast<size_t>(n_m * c.proj_dim));
  o.to_host(seq.data(), y_, n_m * c.proj_dim);
  file_->check_reads();  // reads past a truncation returned zeros (map_guard.h): do not hand them out
  for (int64_t dst = 0; dst < n_m; ++dst)
    std::copy(seq.data() + dst * c.proj_dim, seq.data() + (dst + 1) * c.proj_dim,
              out + int64_t(inv[size_t(dst)]) * c.proj_dim);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace tp
