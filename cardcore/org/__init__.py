"""The group's organization: legal entities, stores, staff, API tokens, grants, audit log."""
