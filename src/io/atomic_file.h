// Atomic, durable file writes. The text goes to PATH.tmp.<pid>, which is fsync'ed and renamed over
// PATH, then PATH's directory is fsync'ed: a reader (or a restart after a crash or a power cut) sees
// either the old file or the whole new one, never a mix.
#pragma once
#include <string>
#include <string_view>

namespace qt {

// Throws "[context] PATH...: ..." when a step fails; the temporary file is removed then.
void write_file_atomically(const std::string& path, std::string_view text, const char* context);

// fsync of a directory, making the creations, renames and removals inside it durable. Best effort:
// a directory that cannot be opened is skipped.
void fsync_directory(const std::string& dir);

}  // namespace qt
