"""Manager cards: the card a manager presents to authorize a special discount, within a
percent of the bill, a daily total and a list of reasons."""
