// The one doctest main shared by every unit-test executable (tests/meson.build
// links it in). Test files must not define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
// themselves; a file that does is built without this one.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
