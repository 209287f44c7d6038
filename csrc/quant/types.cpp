// types.cpp — the type table (GGUF_SPEC §2.1).
#include "quant/types.h"

namespace tp {

TypeTraits type_traits(int32_t type) {
  switch (GgmlType(type)) {
    case GgmlType::F32: return {"F32", 1, 4, true};
    case GgmlType::F16: return {"F16", 1, 2, true};
    case GgmlType::BF16: return {"BF16", 1, 2, true};
    case GgmlType::Q4_0: return {"Q4_0", 32, 18, true};
    case GgmlType::Q4_1: return {"Q4_1", 32, 20, true};
    case GgmlType::Q5_0: return {"Q5_0", 32, 22, true};
    case GgmlType::Q5_1: return {"Q5_1", 32, 24, true};
    case GgmlType::Q8_0: return {"Q8_0", 32, 34, true};
    case GgmlType::Q8_1: return {"Q8_1", 32, 36, false};
    case GgmlType::Q2_K: return {"Q2_K", 256, 84, false};
    case GgmlType::Q3_K: return {"Q3_K", 256, 110, false};
    case GgmlType::Q4_K: return {"Q4_K", 256, 144, true};
    case GgmlType::Q5_K: return {"Q5_K", 256, 176, true};
    case GgmlType::Q6_K: return {"Q6_K", 256, 210, true};
    case GgmlType::Q8_K: return {"Q8_K", 256, 292, false};
    case GgmlType::MXFP4: return {"MXFP4", 32, 17, true};
  }
  return {"?", 0, 0, false};
}

}  // namespace tp
