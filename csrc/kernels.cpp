// lstm.cpp for any x86-64 CPU (ATen's DEFAULT capability: the build's baseline flags).
#include "lstm.cpp"

namespace lstm_ext {
Kernels default_kernels() { return DEFAULT::kernels(); }
}  // namespace lstm_ext
