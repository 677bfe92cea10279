#!/usr/bin/env bash
# Sets up .venv if needed, then registers the bundled sample pair (two patients' upper-abdomen CTs,
# origins ~900 mm apart) and writes the results into demo_output/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
S=Resources/SampleData
.venv/bin/same-register "$S/patientC_abdomen_ct.nii.gz" "$S/patientA_abdomen_ct.nii.gz" -o demo_output \
    --fixed-labels "$S/patientC_abdomen_labels.nii.gz" --moving-labels "$S/patientA_abdomen_labels.nii.gz" \
    --threads 2 "$@"
