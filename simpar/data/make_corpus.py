"""Regenerate ``simpar/data/corpus.txt``: original text from templates and word lists.

Deterministic (seed 1234); run ``python -m simpar.data.make_corpus`` to rebuild the
shipped file byte for byte.  Nothing here runs when simpar is imported.
"""
import os
import random
import textwrap

R = random.Random(1234)

def pick(xs):
    return R.choice(xs)

NAMES = ["Ada", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kira", "Leo", "Maya", "Nils", "Olga", "Pablo", "Rosa", "Sami", "Tara", "Viktor"]
ROLES = ["engineer", "student", "teacher", "researcher", "gardener", "baker", "sailor",
         "librarian", "painter", "carpenter", "nurse", "farmer"]
PLACES = ["the old lab by the river", "a quiet office on the third floor", "the kitchen table",
          "a small cabin in the hills", "the library after closing time", "a train heading north",
          "the roof of the school", "a garden behind the station", "a harbour town",
          "the server room in the basement"]
TIMES = ["one cold morning", "late in the evening", "on a rainy afternoon", "just before dawn",
         "in the middle of winter", "on the first warm day of spring", "after a long week",
         "while the city slept"]

# ---------------------------------------------------------------- computing
DEVICES = ["four devices", "eight devices", "two machines", "a ring of sixteen devices",
           "a single laptop", "a rack of old servers", "two small cards"]
MODELS = ["a small language model", "a tiny transformer", "a model that predicts letters",
          "a network with two layers", "a model of a few million weights"]
PARADIGMS = {
    "data parallelism": [
        "every device holds a full copy of the weights and reads a different slice of the batch",
        "the gradients are summed across devices with an all-reduce before each update",
        "each device sees its own data but they all take the same step",
        "the batch grows with the number of devices while the model stays the same",
    ],
    "tensor parallelism": [
        "each weight matrix is cut into columns or rows and shared among the devices",
        "the first matrix is split by columns and the second by rows, so one all-reduce is enough",
        "the attention heads are divided between the devices like slices of a cake",
        "the devices must talk inside every layer, so they should sit close together",
    ],
    "pipeline parallelism": [
        "the layers are placed on different devices like stations on an assembly line",
        "the batch is cut into micro-batches that flow through the stages one after another",
        "the first and last stages wait at the start and the end, and that idle time is the bubble",
        "with more micro-batches the bubble becomes a smaller share of the step",
    ],
    "expert parallelism": [
        "a router sends each token to one of many experts",
        "the experts live on different devices and the tokens travel to meet them",
        "an expert that receives too many tokens must drop some of them",
        "a small extra loss keeps the router from sending everything to one expert",
    ],
    "sharded optimizer state": [
        "each device keeps only its own share of the moments of the optimizer",
        "the memory for the optimizer shrinks as more devices join",
        "the devices gather the updated weights after every step",
        "the same update is computed, but no device holds all of the state",
    ],
}
PARADIGM_NAMES = list(PARADIGMS)
OBSERVATIONS = [
    "the loss fell slowly at first and then faster",
    "the loss curve was smooth, like a hill seen from far away",
    "two runs with the same seed gave exactly the same numbers",
    "the timeline showed long gaps where a device was waiting",
    "most of the time went into multiplying matrices",
    "the messages were small, but there were many of them",
    "the memory grew with every micro-batch that was still in flight",
    "the gradients matched the reference to many decimal places",
    "a single wrong index made the whole result drift",
    "the step took twice as long when the devices were far apart",
]
LESSONS = [
    "It is easier to trust a fast program once a slow one has checked it.",
    "Every message has a cost, and the cost has two parts: the time to start and the time to send.",
    "A picture of the timeline explains more than a table of numbers.",
    "Memory, not speed, is often the first wall you hit.",
    "The simplest correct version is the best place to start.",
    "When two numbers disagree, the smaller test usually finds the reason.",
    "Waiting is also work, and it should be measured.",
    "Splitting work is easy; putting the pieces back together is the hard part.",
]
ACTIONS = ["wrote a small test", "drew the timeline on paper", "printed the shapes of every array",
           "read the paper again", "made the batch smaller", "ran the reference model first",
           "counted the bytes by hand", "compared the two results line by line",
           "asked a friend to read the code", "slept on the problem"]
PROBLEMS = ["the loss would not go down", "the program hung without a word",
            "the gradients were twice as large as they should be",
            "one device ran out of memory", "the results changed from run to run",
            "the timeline showed a gap nobody could explain",
            "the numbers were right on two devices but wrong on four"]

def computing_story():
    n, role, place, time_ = pick(NAMES), pick(ROLES), pick(PLACES), pick(TIMES)
    par = pick(PARADIGM_NAMES)
    facts = R.sample(PARADIGMS[par], 3)
    p1 = (f"{time_.capitalize()}, {n} sat in {place} and tried to train {pick(MODELS)} on "
          f"{pick(DEVICES)}. {n} was a {role} who had never used {par} before. "
          f"The idea was simple: {facts[0]}. ")
    p1 += f"As the notes said, {facts[1]}."
    prob, a1, a2 = pick(PROBLEMS), *R.sample(ACTIONS, 2)
    p2 = (f"The first attempt failed, because {prob}. {n} {a1}, and then {a2}. "
          f"After an hour the mistake was found: it was small and a little embarrassing. "
          f"Once it was fixed, {pick(OBSERVATIONS)}, and {pick(OBSERVATIONS)}.")
    p3 = (f"In the end {n} wrote down what the day had taught. {pick(LESSONS)} "
          f"Also, {facts[2]}. {pick(LESSONS)}")
    return f"{n} and {par}", [p1, p2, p3]

# ------------------------------------------------------------------- nature
ANIMALS = ["a fox", "an old heron", "a family of ducks", "a grey cat", "a young deer",
           "a swarm of bees", "a crow", "a small brown rabbit", "an owl", "a pair of swans"]
LANDS = ["the forest", "the meadow", "the marsh", "the river bank", "the valley",
         "the edge of the lake", "the pine wood", "the orchard", "the dunes", "the hills"]
WEATHER = ["the wind turned cold", "a light rain began to fall", "the fog lifted slowly",
           "the sun broke through the clouds", "snow covered the path", "the air was still and warm",
           "thunder rolled far away", "the first frost made the grass white"]
SEASON_DESC = {
    "spring": ["the buds opened on every branch", "the birds came back from the south",
               "the streams were full of melted snow", "green shoots pushed through the soil"],
    "summer": ["the days were long and the nights were short", "the fields turned gold",
               "insects hummed over the water", "the shade of the oaks was the best place to rest"],
    "autumn": ["the leaves turned red and yellow", "the apples fell in the grass",
               "the geese flew south in long lines", "the mornings smelled of smoke and rain"],
    "winter": ["the lake froze from the edges inward", "the trees stood bare against the sky",
               "tracks in the snow told who had passed", "the nights were long and very quiet"],
}
NATURE_VERBS = ["walked slowly along", "rested near", "searched for food in", "crossed",
                "watched the sky above", "listened to the sounds of", "hid at the edge of"]

def nature_story():
    season = pick(list(SEASON_DESC))
    d = R.sample(SEASON_DESC[season], 3)
    a1, a2 = R.sample(ANIMALS, 2)
    l1, l2 = R.sample(LANDS, 2)
    p1 = (f"In {season}, {d[0]}. {a1.capitalize()} {pick(NATURE_VERBS)} {l1}, and "
          f"{a2} {pick(NATURE_VERBS)} {l2}. Then {pick(WEATHER)}.")
    p2 = (f"Nobody was there to see it, but {d[1]}. {pick(WEATHER).capitalize()}, and later "
          f"{pick(WEATHER)}. By the evening {d[2]}, and {a1} went back to {l1}.")
    return f"A {season} day: {l1}", [p1, p2]

# ----------------------------------------------------------------- essays
ESSAY_TOPICS = {
    "On patience": [
        "Patience is not the same as waiting.",
        "A seed in the ground does not hurry, and yet it grows.",
        "A long training run teaches the same lesson: the loss does not fall because we stare at it.",
        "It falls because each small step points a little closer to the goal.",
        "The hard part is to check the first steps carefully and then to let the work run.",
    ],
    "On counting": [
        "Before you can make something faster, you have to count what it does.",
        "Count the bytes that move and the numbers that are multiplied.",
        "Count the time a device spends waiting for its neighbour.",
        "Most surprises disappear once the counting is honest.",
        "The ones that remain are the interesting ones.",
    ],
    "On rivers": [
        "A river is never the same water twice, yet we give it one name.",
        "It carries sand from the mountains to the sea, a grain at a time.",
        "In flood it moves stones that no person could lift.",
        "In a dry summer it becomes a thin line of bright water between the rocks.",
        "Those who live beside it learn to read its moods.",
    ],
    "On small programs": [
        "A small program can be read in one sitting.",
        "It can be held in the mind, and so it can be understood.",
        "A large program is a city; a small one is a house with a few rooms.",
        "When you learn how something works, start with the house.",
        "The city will still be there when you are ready.",
    ],
    "On teaching": [
        "A good teacher shows the same idea from several sides.",
        "First the picture, then the numbers, then the picture again.",
        "A learner who can predict the result has understood more than one who can recite the rule.",
        "Mistakes are welcome, as long as they are made in the open.",
        "The best question is the one that the learner asks next.",
    ],
}
CONNECT = ["Perhaps", "In a way", "Of course", "Still", "Even so", "For this reason", "Now and then"]
ESSAY_EXTRA = [
    "this is true of gardens as much as of machines",
    "the same thing can be said about learning to cook",
    "it takes a while to see it, but once seen it is hard to forget",
    "this is why simple tools last so long",
    "a careful person notices it early",
    "the old sailors knew this without any equations",
]

def essay():
    title = pick(list(ESSAY_TOPICS))
    sents = list(ESSAY_TOPICS[title])
    paras = []
    for _ in range(2):
        k = R.randint(3, 5)
        body = " ".join(R.sample(sents, k))
        body += f" {pick(CONNECT)}, {pick(ESSAY_EXTRA)}."
        paras.append(body)
    return title, paras

# ------------------------------------------------------------ dialogues
QUESTIONS = [
    ("Why do we need more than one device?",
     "Because the model or the batch no longer fits on one, or because one is too slow."),
    ("What is an all-reduce?",
     "Every device gives a number, and every device gets back the sum of all of them."),
    ("Why is there a bubble in the pipeline?",
     "At the start the last stage has nothing to do, and at the end the first stage is idle."),
    ("How do we know the parallel model is right?",
     "We run the same input through the reference model and compare every number."),
    ("What does the optimizer keep in memory?",
     "For Adam it keeps two moments for every weight, so twice the size of the model."),
    ("Why does the loss start near the log of the vocabulary?",
     "At first the model guesses every letter with almost the same chance."),
    ("What is a micro-batch?",
     "A small piece of the batch that can travel through the pipeline on its own."),
    ("Why should tensor parallel devices be close together?",
     "They exchange messages inside every layer, so a slow link would stall them all."),
]

def dialogue():
    a, b = R.sample(NAMES, 2)
    qs = R.sample(QUESTIONS, 3)
    lines = []
    for q, ans in qs:
        lines.append(f'"{q}" asked {a}.')
        lines.append(f'"{ans[:-1]}," said {b}.')
    lines.append(f'{a} thought about it for a while and nodded. "Let us try it," {a} said.')
    return f"{a} asks {b}", [" ".join(lines[:2]), " ".join(lines[2:4]), " ".join(lines[4:])]

# ------------------------------------------------------------ handwritten
PREFACE = """\
A Small Book of Stories for Small Models

This text was written for training tiny models that read one letter at a time. It is
plain English, made of short stories, little essays and conversations. Some of them are
about computers and the many devices that work together to train a model; others are
about fields, rivers, animals and the seasons. The words repeat often, which makes the
text easy to learn, and the sentences are short, which makes the mistakes of a young
model easy to see.

A model that has read nothing guesses every letter with the same chance. After a few
hundred steps it learns that a space follows most words, that the letter q likes the
letter u, and that a sentence ends with a full stop. Later it learns whole words, and
much later, if it is large enough, it learns a little about what the words mean.
"""

def wrap(p):
    return textwrap.fill(p, width=88)

def main():
    makers = [computing_story] * 4 + [nature_story] * 3 + [essay] * 1 + [dialogue] * 2
    parts = [PREFACE]
    size = len(PREFACE)
    i = 1
    while size < 200_000:
        title, paras = pick(makers)()
        block = f"{i}. {title}\n\n" + "\n\n".join(wrap(p) for p in paras) + "\n"
        parts.append(block)
        size += len(block) + 1
        i += 1
    text = "\n".join(parts)
    text.encode("ascii")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt"), "w") as f:
        f.write(text)
    print(len(text), i, len(set(text)))


if __name__ == "__main__":
    main()
