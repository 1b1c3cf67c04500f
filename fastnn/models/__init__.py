"""Networks built on fastnn's modules."""
__all__ = []
