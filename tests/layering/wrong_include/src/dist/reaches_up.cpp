// A deliberately wrong include for tests/layering: dist sits below nn, so
// this line must be refused by scripts/check_layers.py.
#include "tessera/nn/model.h"
