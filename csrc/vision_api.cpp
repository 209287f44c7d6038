// vision_api.cpp — the vision encoder's C ABI (include/turboprefill.h "vision encoder") over model/vision.h.
//
// Same contract as api.cpp: every entry point catches every exception and returns a tp_status, with the
// message in tp_last_error(); this file only checks the caller's pointers and buffer sizes.
#include <cstring>
#include <memory>

#include "common.h"
#include "model/vision.h"

struct tp_vision {
  std::unique_ptr<tp::VisionModel> impl;
};

#define TP_VGUARD_BEGIN \
  try {                 \
    tp::set_last_error("");
#define TP_VGUARD_END                           \
  }                                             \
  catch (...) {                                 \
    return tp::status_from_current_exception(); \
  }                                             \
  return TP_OK;

extern "C" {

tp_status tp_vision_create(const char* mmproj_path, const char* device, int32_t n_threads, tp_vision** out) {
  TP_VGUARD_BEGIN
  if (!mmproj_path || !out) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_vision_create: null path or out pointer");
  *out = nullptr;
  auto v = std::make_unique<tp_vision>();
  v->impl = std::make_unique<tp::VisionModel>(mmproj_path, device ? device : "cpu", n_threads);
  *out = v.release();
  TP_VGUARD_END
}

tp_status tp_vision_info_get(const tp_vision* vision, tp_vision_info* out) {
  TP_VGUARD_BEGIN
  if (!vision || !out) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_vision_info_get: null handle or out pointer");
  const tp::ClipConfig& c = vision->impl->config();
  std::memset(out, 0, sizeof(*out));
  std::strncpy(out->projector, c.projector.c_str(), sizeof(out->projector) - 1);
  out->n_embd = c.n_embd;
  out->n_layer = c.n_layer;
  out->n_head = c.n_head;
  out->head_dim = c.head_dim;
  out->n_ff = c.n_ff;
  out->patch_size = c.patch_size;
  out->merge_size = c.merge_size;
  out->proj_dim = c.proj_dim;
  out->merger_dim = c.merger_dim;
  out->window_px = c.window_px;
  out->n_wa_pattern = c.n_wa_pattern;
  out->image_size = c.image_size;
  out->min_pixels = c.min_pixels;
  out->max_pixels = c.max_pixels;
  for (int i = 0; i < 3; ++i) {
    out->image_mean[i] = c.image_mean[i];
    out->image_std[i] = c.image_std[i];
  }
  TP_VGUARD_END
}

tp_status tp_vision_encode(tp_vision* vision, const float* pixels, int64_t height, int64_t width, float* out,
                           int64_t out_len, double* seconds) {
  TP_VGUARD_BEGIN
  if (!vision || !pixels || !out) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_vision_encode: null handle or buffer");
  tp::VisionModel& m = *vision->impl;
  m.check_image(height, width);  // first: out_len below is computed from valid dimensions
  const int64_t need = m.n_merged(height, width) * m.config().proj_dim;
  if (out_len != need)
    tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_vision_encode: output buffer holds %lld floats; a %lld x %lld image "
             "gives %lld x %lld = %lld", (long long)out_len, (long long)height, (long long)width,
             (long long)m.n_merged(height, width), (long long)m.config().proj_dim, (long long)need);
  const double s = m.encode(pixels, height, width, out);
  if (seconds) *seconds = s;
  TP_VGUARD_END
}

void tp_vision_free(tp_vision* vision) { delete vision; }

}  // extern "C"
