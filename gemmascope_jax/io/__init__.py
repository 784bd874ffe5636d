"""File input and output on the lowest floor (imports nothing else of the package).

- `io.safetensors`: lazy, memory-mapped safetensors reading and atomic writing, bfloat16
  included (`SafetensorsFile`, `read_safetensors`, `write_safetensors`, `SafetensorsError`).
- `io.files`: output folders and files written atomically that never replace what we did not
  make (`atomic_output_dir`, `atomic_output_file`, `check_replaceable`, `OUTPUT_MARKER`),
  JSON object files (`read_json`, `write_json`), `path_inside`, and their one error type,
  `FormatError`.
"""
