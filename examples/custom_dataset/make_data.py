"""Write a small datasets.DatasetDict of conversational sums to the folder given on the command line.

    python examples/custom_dataset/make_data.py OUT_DIR

`train` (80 rows) is trained on and `test` (20 rows) is the held-out split. Each prompt is TRL's
conversational list of {role, content} messages (rendered with the model's chat template); the answer
column is `solution`, which policylab finds on its own (it looks for answer, then solution, then ground_truth).
"""

import sys

import datasets

out = sys.argv[1] if len(sys.argv) > 1 else "sums"
rows = [{"prompt": [{"role": "user", "content": f"{a} + {b}="}], "solution": str(a + b)}
        for a in range(10) for b in range(10)]
datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:80]),
                      "test": datasets.Dataset.from_list(rows[80:])}).save_to_disk(out)
print(f"wrote {out}: 80 train and 20 test rows")
