"""Test-time search over the samplers/ contracts: verifiers, NFE budgets, best-of-N, EvoSearch, RBF, FKC.

The entry point is `run_search` (search/registry.py); `SEARCHES` and `VERIFIERS` are the registries the
server validates requests against and lists.  No I/O here: verifiers are built from loaded resources.
"""

from .budget import Budget, CountedModel
from .core import SearchProgress, SearchResult
from .registry import SEARCHES, SearchSpec, catalog, run_search, validate_search
from .verifiers import VERIFIERS, Verifier, VerifierSpec, build_verifier, validate_verifier

__all__ = ["SEARCHES", "VERIFIERS", "Budget", "CountedModel", "SearchProgress", "SearchResult", "SearchSpec",
           "Verifier", "VerifierSpec", "build_verifier", "catalog", "run_search", "validate_search",
           "validate_verifier"]
