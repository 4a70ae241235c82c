"""Below everything: errors, paths, the one clock, running tools with progress, the lab lock."""
