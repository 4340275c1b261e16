// The Python module lstm_ext._C. Importing it loads this library, whose static initialisers
// register the operators with the dispatcher (lstm.cpp); Python calls them as torch.ops.lstm_ext.*.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lstm_ext operators, registered as torch.ops.lstm_ext.forward / torch.ops.lstm_ext.backward";
}
