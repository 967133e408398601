"""Privacy errors that cross process boundaries; importing them pulls in no Opacus."""

from __future__ import annotations


class PrivacyBudgetExhausted(RuntimeError):
    """The hospital's next round would take its epsilon past the budget; it does not train."""

    def __init__(self, hospital: str, spent: float, projected: float, budget: float) -> None:
        super().__init__(hospital, spent, projected, budget)  # args as given: survives pickling
        self.hospital, self.spent, self.projected, self.budget = hospital, spent, projected, budget

    def __str__(self) -> str:
        return (f"hospital {self.hospital}: privacy budget exhausted (epsilon spent "
                f"{self.spent:.3f}, next round would reach {self.projected:.3f} > budget "
                f"{self.budget:.3f})")
