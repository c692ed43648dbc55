"""Fine-tuning tasks: classify.py (the book's chapter 6 spam classifier, with LoRA from appendix E)."""
