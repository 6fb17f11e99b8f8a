// Whole-file writes that never leave a half-written file behind: the bytes go to PATH.tmp.<pid>,
// which is fsync'ed and then renamed over PATH (a reader sees the old file or the new one).
#pragma once
#include <string>
#include <string_view>

namespace qt {

// Returns false and says why in *error (the temporary file removed) when it cannot.
bool write_file_atomic(const std::string& path, std::string_view bytes, std::string* error);

}  // namespace qt
