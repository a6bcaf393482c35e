"""The demo task's word lists, all written for this project (no third-party text).

No list repeats an entry, so a prompt is fixed by (template, parameters), each
question has one answer, and a family's number of distinct prompts can be counted.
The order of every list is part of the shipped data: the samplers draw from them by
index, so reordering one changes the generated files.
"""

from __future__ import annotations

# Each word appears once in the whole table, so "the opposite of X" has one answer.
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("happy", "sad"), ("fast", "slow"),
    ("light", "dark"), ("up", "down"), ("open", "closed"), ("early", "late"),
    ("full", "empty"), ("tall", "short"), ("old", "young"), ("hard", "soft"),
    ("wet", "dry"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"),
    ("clean", "dirty"), ("thick", "thin"), ("win", "lose"), ("push", "pull"),
    ("buy", "sell"), ("give", "take"), ("first", "last"), ("inside", "outside"),
    ("above", "below"), ("always", "never"), ("true", "false"), ("begin", "end"),
    ("day", "night"), ("left", "right"), ("north", "south"), ("east", "west"),
    ("sweet", "sour"), ("safe", "dangerous"), ("easy", "difficult"),
    ("cheap", "expensive"), ("friend", "enemy"), ("question", "answer"),
    ("arrive", "leave"), ("asleep", "awake"), ("remember", "forget"),
    ("wide", "narrow"), ("smooth", "rough"), ("near", "far"),
    ("accept", "refuse"), ("increase", "decrease"), ("entrance", "exit"),
)
# Both directions ("hot" -> "cold" and "cold" -> "hot"), and every word in a fixed
# order for the rng.
OPPOSITE_OF = {**dict(OPPOSITES), **{b: a for a, b in OPPOSITES}}
OPPOSITE_WORDS = tuple(w for pair in OPPOSITES for w in pair)

# Lowercase letters only, so "number of letters" is simply len(word).
WORDS = (
    "cat", "sun", "moon", "star", "book", "tree", "fish", "bird", "lamp", "nest",
    "cloud", "dream", "flame", "grape", "heart", "honey", "lemon", "mango",
    "ocean", "piano", "quilt", "river", "tiger", "zebra", "apple", "chair",
    "garden", "window", "pencil", "rabbit", "orange", "planet", "bridge",
    "castle", "dragon", "forest", "guitar", "island", "jacket", "kitten",
    "ladder", "market", "needle", "pillow", "rocket", "silver", "tomato",
    "turtle", "valley", "wizard", "yellow", "button", "candle", "dinner",
    "engine", "hammer", "insect", "jungle", "kettle", "magnet", "puzzle",
    "sunset", "teacup", "marble", "whistle", "blanket", "library", "penguin",
    "rainbow", "umbrella", "mountain", "elephant", "sandwich", "butterfly",
)

# Short, plain phrases for the capital-letters family.
PHRASES = (
    "good morning", "happy birthday", "see you soon", "thank you very much",
    "welcome home", "have a nice day", "the sky is blue", "keep it simple",
    "well done", "time for lunch", "open the door", "let's go outside",
    "the cat is asleep", "rain is coming", "we like green tea", "please wait here",
    "the shop is closed", "good luck today", "read the label", "mind the step",
    "lights off at ten", "the train is late", "save your work", "drink more water",
    "fresh bread for sale", "quiet please", "back in five minutes", "no parking",
    "the garden is lovely", "call me later", "pack a warm coat", "dinner is ready",
    "turn left here", "best wishes", "all hands on deck", "one step at a time",
)

# singular -> plural; regular, -es, -y -> -ies, -f -> -ves and irregular forms.
PLURALS = (
    ("cat", "cats"), ("dog", "dogs"), ("house", "houses"), ("tree", "trees"),
    ("book", "books"), ("car", "cars"), ("apple", "apples"), ("river", "rivers"),
    ("chair", "chairs"), ("bird", "birds"), ("idea", "ideas"), ("window", "windows"),
    ("boy", "boys"), ("key", "keys"), ("day", "days"),
    ("box", "boxes"), ("bus", "buses"), ("fox", "foxes"), ("church", "churches"),
    ("dish", "dishes"), ("glass", "glasses"), ("watch", "watches"), ("brush", "brushes"),
    ("baby", "babies"), ("city", "cities"), ("party", "parties"), ("story", "stories"),
    ("berry", "berries"), ("lady", "ladies"),
    ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("shelf", "shelves"),
    ("half", "halves"), ("loaf", "loaves"), ("life", "lives"),
    ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"),
    ("child", "children"), ("mouse", "mice"), ("goose", "geese"), ("foot", "feet"),
    ("tooth", "teeth"), ("man", "men"), ("woman", "women"), ("person", "people"),
    ("ox", "oxen"), ("cactus", "cacti"), ("sheep", "sheep"), ("fish", "fish"),
    ("deer", "deer"),
)

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# (larger unit, smaller unit, how many smaller units make one larger unit).
UNITS = (
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
    ("weeks", "days", 7), ("years", "months", 12), ("metres", "centimetres", 100),
    ("centimetres", "millimetres", 10), ("kilometres", "metres", 1000),
    ("kilograms", "grams", 1000), ("litres", "millilitres", 1000),
)
UNIT_AMOUNTS = range(2, 13)  # from 2 so every unit name is plural

# Paint mixing: the three primary pairs plus two tints, asked in either order.
COLOUR_MIXES = (
    ("red", "yellow", "orange"), ("blue", "yellow", "green"), ("red", "blue", "purple"),
    ("red", "white", "pink"), ("black", "white", "grey"),
)

NUMBERS = range(2, 100)  # operands for the arithmetic family
SORT_POOL = range(1, 31)  # values to sort; drawn without repeats
SORT_SIZES = (3, 4, 5)
