"""The committee: a BFT-replicated ledger of registrations, reputation and credit.

(Package map filled in as modules land; see docs/committee.md.)
"""
