"""Value retriever: the value statement LiVO should align a prompt with, or none.

`retrieve(prompt)` runs two stages, as the original does (docs/method.md §6):

1. Toxicity by keyword (stage "keyword"): the original word lists, checked in their order
   (nudity, bloody, zombie); the first kind with a match gives "<kind> considered inappropriate".
   Unlike the original's substring search we match whole words, so "Essex" is not "sex" and
   "deadline" is not "dead" (see `_word_pattern` for plurals and phrases).
2. Bias, when the prompt shows a person: "gender equality" or "racial equality", else no value.
   - Offline by default (stage "lexicon"): a list of person words decides whether there is a
     person, and the value is the attribute the prompt leaves open (see `lexicon_value`).
   - With a `chat.ChatClient` (stage "llm"): an OpenAI-compatible chat endpoint answers a
     few-shot question (the client retries transient failures). Any failure (timeout,
     connection or HTTP error, refused redirect, bad JSON, unparsable answer) falls back to
     the lexicon's answer (stage "llm-fallback") and never raises.

Where the original picks one of the two values at random, we pick by a hash of the prompt, so a
prompt always gets the same value, in every process.

Command line (the last stdout line is the value, or "not applicable"; the stage goes to stderr):

  python -m livo_jax.retriever "a photo of a doctor"
  python -m livo_jax.retriever --llm_url=http://localhost:8000/v1 --llm_model=MODEL "a nurse"
"""

import dataclasses
import hashlib
import os
import re
import sys

from absl import app
from absl import flags

from livo_jax import chat

NOT_APPLICABLE = "not applicable"
GENDER_EQUALITY = "gender equality"
RACIAL_EQUALITY = "racial equality"
DEFAULT_LLM_MODEL = chat.DEFAULT_MODEL

# ---------------------------------------------------------------------------------------------
# Word lists.

# The original lists, in the original order: the first kind with a match wins.
TOXIC_KEYWORDS = (
    ("nudity", ("nudity", "naked", "nude", "lewd", "erotic", "sexy", "pussy", "no clothes",
                "nsfw", "fuck", "fucked", "sex", "no panties", "orgasm", "porn", "making love",
                "boobs")),
    ("bloody", ("bloody", "blood", "bloodied")),
    ("zombie", ("zombie", "dead")),
)

# Person words that say nothing about gender or race. Words that are often something else in
# an image prompt are left out ("model", "coach", "boxer", "baby" as in "baby elephant",
# "shepherd" as in "German shepherd", "bishop", "patient", "player", "agent"); some of them
# come back inside a phrase ("fashion model", "tennis player").
NEUTRAL_PERSON_WORDS = (
    # People and roles.
    "person", "people", "human", "adult", "teen", "teenager", "adolescent", "kid", "child",
    "children", "toddler", "infant", "newborn", "youngster", "parent", "grandparent", "sibling",
    "spouse", "cousin", "friend", "neighbor", "neighbour", "stranger", "tourist", "traveler",
    "traveller", "hiker", "passenger", "pedestrian", "customer", "shopper", "citizen",
    "villager", "crowd", "worker", "employee", "employer", "boss", "colleague", "coworker",
    "volunteer", "leader", "hero", "villain", "celebrity", "billionaire", "millionaire",
    "philanthropist", "saint", "genius", "thief", "thieves", "robber", "burglar", "murderer",
    "gangster", "terrorist", "criminal", "prisoner", "inmate", "beggar", "refugee", "immigrant",
    "addict", "warrior", "knight", "samurai", "ninja", "viking", "wizard", "witch", "pirate",
    "superhero", "someone", "somebody", "everyone", "everybody",
    # Occupations.
    "accountant", "actor", "administrator", "ambassador", "analyst", "anesthesiologist",
    "announcer", "archaeologist", "architect", "artist", "astronaut", "astronomer", "athlete",
    "attorney", "auditor", "author", "baker", "banker", "barber", "barista", "bartender",
    "biologist", "blacksmith", "bodyguard", "bookkeeper", "bricklayer", "butcher", "butler",
    "cardiologist", "caregiver", "carpenter", "cashier", "ceo", "cfo", "chef", "chemist",
    "chiropractor", "choreographer", "clerk", "comedian", "composer", "consultant", "counselor",
    "counsellor", "courier", "curator", "custodian", "cyclist", "dancer", "dentist",
    "dermatologist", "designer", "detective", "dietitian", "diplomat", "director", "doctor",
    "driver", "drummer", "economist", "electrician", "engineer", "entrepreneur", "executive",
    "farmer", "filmmaker", "firefighter", "florist", "footballer", "gardener", "geologist",
    "governor", "guard", "guitarist", "gymnast", "hairdresser", "hairstylist", "historian",
    "housekeeper", "hunter", "illustrator", "instructor", "investor", "janitor", "jeweler",
    "jeweller", "jockey", "journalist", "judge", "juror", "lawyer", "lecturer", "librarian",
    "lifeguard", "locksmith", "lumberjack", "machinist", "magician", "manager",
    "mathematician", "mayor", "mechanic", "medic", "merchant", "midwife", "miner", "minister",
    "missionary", "musician", "nanny", "neurologist", "newscaster", "novelist", "nurse",
    "nutritionist", "officer", "optician", "optometrist", "painter", "paralegal", "paramedic",
    "pastor", "pediatrician", "pharmacist", "philosopher", "photographer", "physician",
    "physicist", "physiotherapist", "pianist", "pilot", "plumber", "poet", "politician",
    "president", "priest", "producer", "professor", "programmer", "prosecutor", "psychiatrist",
    "psychologist", "rabbi", "radiologist", "rancher", "realtor", "receptionist", "referee",
    "reporter", "researcher", "sailor", "salesperson", "scholar", "scientist", "sculptor",
    "secretary", "senator", "sheriff", "shopkeeper", "singer", "soldier", "spokesperson",
    "statistician", "stockbroker", "student", "surgeon", "surveyor", "tailor", "teacher",
    "technician", "therapist", "trader", "translator", "tutor", "umpire", "veterinarian",
    "violinist", "waiter", "warden", "welder", "writer", "youtuber", "zookeeper",
    # Phrases whose last word alone would be too loose.
    "fashion model", "flight attendant", "mail carrier", "tour guide", "real estate agent",
    "secret agent", "drug dealer", "tennis player", "football player", "soccer player",
    "basketball player", "baseball player", "chess player",
)

# Person words that fix the person's gender, including the gendered pronouns. "they"/"them"
# are left out: in a prompt they as often refer to things ("apples, they are red").
GENDERED_PERSON_WORDS = (
    "he", "him", "his", "himself", "she", "her", "hers", "herself",
    "man", "men", "woman", "women", "boy", "girl", "guy", "dude", "gentleman", "gentlemen",
    "lady", "gal", "lad", "lass", "schoolboy", "schoolgirl", "mother", "father", "mom", "mum",
    "dad", "son", "daughter", "brother", "sister", "husband", "wife", "wives", "grandmother",
    "grandfather", "grandma", "grandpa", "grandson", "granddaughter", "uncle", "aunt", "nephew",
    "niece", "boyfriend", "girlfriend", "bride", "bridegroom", "widow", "widower", "king",
    "queen", "prince", "princess", "actress", "waitress", "stewardess", "hostess", "seamstress",
    "ballerina", "heroine", "priestess", "nun", "monk", "maid", "cowboy", "cowgirl",
    "businessman", "businessmen", "businesswoman", "businesswomen", "policeman", "policemen",
    "policewoman", "policewomen", "fireman", "firemen", "fisherman", "fishermen", "salesman",
    "salesmen", "saleswoman", "saleswomen", "postman", "postmen", "mailman", "mailmen",
    "doorman", "doormen", "handyman", "handymen", "chairman", "chairwoman",
)

# Words that fix gender without being a person ("a female doctor").
GENDER_WORDS = ("male", "female", "masculine", "feminine")

# Words that fix race or ethnicity. "white" and "black" are left out: in a prompt they are
# mostly colours ("a doctor in a white coat"); so is "race" ("a race car driver").
RACE_WORDS = (
    "asian", "african", "african american", "caucasian", "hispanic", "latino", "latina",
    "latinx", "indian", "native american", "indigenous", "arab", "middle eastern", "ethnic",
    "ethnicity",
)


def _word_pattern(entry: str) -> str:
  """A regex for one list entry as whole words, its last word optionally in the plural.

  Words of a phrase may be separated by any whitespace or hyphens ("no  clothes",
  "no-clothes"). The plural follows the regular English rule: "-y" after a consonant becomes
  "-ies" ("nanny" -> "nannies"), words ending in s/x/z/ch/sh take "-es" ("boss" -> "bosses"),
  others take "-s" ("zombie" -> "zombies"). Irregular plurals are list entries of their own.
  """
  *head, last = entry.split()
  if re.search(r"[^aeiou]y$", last):
    last = re.escape(last[:-1]) + "(?:y|ies)"
  elif re.search(r"(?:s|x|z|ch|sh)$", last):
    last = re.escape(last) + "(?:es)?"
  else:
    last = re.escape(last) + "s?"
  return r"[\s-]+".join([*map(re.escape, head), last])


def _compile(entries, *, compounds: bool = True) -> re.Pattern:
  """One case-insensitive regex matching any of `entries` as whole words.

  Hyphens and punctuation are word boundaries ("blood-soaked" has "blood"), letters and
  digits are not ("bloodhound" has no "blood"). With `compounds=False` a word that starts a
  hyphenated compound does not count: "man-made", "queen-size" and "mother-of-pearl" describe
  things, not people ("Spider-Man" still counts).
  """
  end = r"\b" if compounds else r"\b(?!-\w)"
  return re.compile(r"\b(?:" + "|".join(map(_word_pattern, entries)) + ")" + end,
                    re.IGNORECASE)


_TOXIC_PATTERNS = tuple((kind, _compile(words)) for kind, words in TOXIC_KEYWORDS)
_PERSON_PATTERN = _compile(NEUTRAL_PERSON_WORDS + GENDERED_PERSON_WORDS, compounds=False)
_GENDER_FIXED_PATTERN = _compile(GENDERED_PERSON_WORDS + GENDER_WORDS, compounds=False)
_RACE_FIXED_PATTERN = _compile(RACE_WORDS)


# ---------------------------------------------------------------------------------------------
# The result.

@dataclasses.dataclass(frozen=True)
class Retrieval:
  """What the retriever decided for one prompt.

  Attributes:
    value: the value statement, or None when no value applies.
    stage: which stage decided: "keyword", "lexicon", "llm", or "llm-fallback" (the LLM
      failed and the lexicon decided; `note` says why it failed).
    note: a human-readable reason (the matched word, the LLM's answer, the failure).
  """
  value: str | None
  stage: str
  note: str = ""

  @property
  def statement(self) -> str:
    """The value, or "not applicable" when there is none."""
    return NOT_APPLICABLE if self.value is None else self.value

  def __str__(self) -> str:
    return self.statement


# ---------------------------------------------------------------------------------------------
# Offline stages.

def toxic_value(prompt: str) -> Retrieval | None:
  """Stage 1: the toxicity value of the first keyword kind found in `prompt`, or None."""
  for kind, pattern in _TOXIC_PATTERNS:
    match = pattern.search(prompt)
    if match:
      return Retrieval(f"{kind} considered inappropriate", "keyword",
                       f"matched {match.group(0)!r}")
  return None


def stable_choice(prompt: str) -> str:
  """Gender or racial equality, picked by a hash of the prompt (not Python's salted `hash`).

  Case and runs of whitespace do not change the pick.
  """
  normalised = " ".join(prompt.lower().split())
  digest = hashlib.sha256(normalised.encode("utf-8")).digest()
  return GENDER_EQUALITY if digest[0] % 2 == 0 else RACIAL_EQUALITY


def lexicon_value(prompt: str) -> Retrieval:
  """Stage 2 offline: a bias value when a person word is found, else no value.

  The value debiases the attribute the prompt leaves open: a prompt that fixes gender ("a
  woman", "he", "a female doctor") gets "racial equality", one that fixes race ("an Asian
  doctor") gets "gender equality"; when it fixes neither, or both, `stable_choice` picks.
  """
  person = _PERSON_PATTERN.search(prompt)
  if not person:
    return Retrieval(None, "lexicon", "no person word")
  found = f"person word {person.group(0)!r}"
  gender = _GENDER_FIXED_PATTERN.search(prompt)
  race = _RACE_FIXED_PATTERN.search(prompt)
  if gender and not race:
    return Retrieval(RACIAL_EQUALITY, "lexicon", f"{found}; {gender.group(0)!r} fixes gender")
  if race and not gender:
    return Retrieval(GENDER_EQUALITY, "lexicon", f"{found}; {race.group(0)!r} fixes race")
  return Retrieval(stable_choice(prompt), "lexicon", f"{found}; picked by prompt hash")


# ---------------------------------------------------------------------------------------------
# LLM stage.

SYSTEM_PROMPT = (
    "You choose the value principle for a text-to-image prompt. First decide whether the "
    "image would show a person. If not, answer exactly: no\n"
    "If it would, name the attribute that the prompt leaves open, so that images can be "
    "balanced over it:\n"
    "- yes: racial equality (the prompt fixes the person's gender but not their race)\n"
    "- yes: gender equality (the prompt fixes race or ethnicity but not gender)\n"
    "- yes: either (the prompt fixes neither, or both)\n"
    "Answer with one of these four lines and nothing else."
)

# (prompt, answer) pairs shown to the model as earlier turns of the conversation.
FEW_SHOT_EXAMPLES = (
    ("a photo of a doctor", "yes: either"),
    ("a bowl of fruit on a table", "no"),
    ("a portrait of a female firefighter", "yes: racial equality"),
    ("an African American CEO giving a speech", "yes: gender equality"),
    ("a cat sleeping on a sofa by the window", "no"),
    ("a grandmother baking cookies in her kitchen", "yes: racial equality"),
    ("a crowd of people at a concert", "yes: either"),
)

# An answer line: "no", or "yes" alone or with a choice after ":", "," or "-".
_ANSWER_PATTERN = re.compile(
    r"no|yes(?:\s*[:,-]\s*(?P<choice>either|(?P<kind>gender|racial)(?: equality)?))?")


def parse_answer(text: str) -> str:
  """The LLM's reply as "no", "either", "gender equality" or "racial equality".

  Only the first non-empty line counts. Case, surrounding whitespace and quotes, and one final
  period are ignored; a bare "yes" means "either". Anything else raises `chat.ChatError`.
  """
  lines = text.strip().splitlines() or [""]
  line = lines[0].strip().strip("\"'`").strip().lower().removesuffix(".")
  match = _ANSWER_PATTERN.fullmatch(line)
  if not match:
    raise chat.ChatError(f"unparsable answer {text.strip()[:80]!r}")
  if match[0] == "no":
    return "no"
  if match["kind"]:
    return GENDER_EQUALITY if match["kind"] == "gender" else RACIAL_EQUALITY
  return "either"


def messages(prompt: str) -> list[dict]:
  """The few-shot conversation that asks about `prompt`."""
  conversation = [{"role": "system", "content": SYSTEM_PROMPT}]
  for example, answer in FEW_SHOT_EXAMPLES:
    conversation.append({"role": "user", "content": f"Prompt: {example}"})
    conversation.append({"role": "assistant", "content": answer})
  conversation.append({"role": "user", "content": f"Prompt: {prompt}"})
  return conversation


def ask(llm: chat.ChatClient, prompt: str) -> str:
  """The model's answer for `prompt`, as `parse_answer` returns it; `ChatError` on failure."""
  return parse_answer(llm.complete(messages(prompt), temperature=0))


# ---------------------------------------------------------------------------------------------
# Both stages.

def retrieve(prompt: str, *, llm: chat.ChatClient | None = None) -> Retrieval:
  """The value statement for `prompt`: toxicity keywords first, then the person stage.

  Args:
    prompt: the text-to-image prompt.
    llm: the endpoint for the person stage; None (the default) uses the offline lexicon and
      makes no network call.

  Returns:
    A `Retrieval`; its `value` is None when no value applies. LLM failures never raise: they
    give the lexicon's answer with stage "llm-fallback".
  """
  toxic = toxic_value(prompt)
  if toxic:
    return toxic
  if llm is None:
    return lexicon_value(prompt)
  try:
    answer = ask(llm, prompt)
  except chat.ChatError as e:
    offline = lexicon_value(prompt)
    return Retrieval(offline.value, "llm-fallback", f"llm failed: {e}; lexicon: {offline.note}")
  if answer == "no":
    return Retrieval(None, "llm", "llm answered 'no'")
  if answer == "either":
    return Retrieval(stable_choice(prompt), "llm", "llm answered 'either'; picked by prompt hash")
  return Retrieval(answer, "llm", f"llm answered {answer!r}")


def main(argv: list[str]) -> None:
  """`python -m livo_jax.retriever [--llm_url=...] PROMPT`: the value on the last stdout line."""
  values = flags.FLAGS
  try:
    if len(argv) != 2:
      raise ValueError("give one prompt: python -m livo_jax.retriever \"PROMPT\"")
    api_key = None
    if values.llm_api_key_env:
      api_key = os.environ.get(values.llm_api_key_env)
      if not api_key:
        raise ValueError(f"--llm_api_key_env names ${values.llm_api_key_env}, which is not set")
    llm = chat.ChatClient.from_env(values.llm_url, values.llm_model, api_key, values.timeout,
                                   values.retries)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  result = retrieve(argv[1], llm=llm)
  print(f"stage: {result.stage} ({result.note})", file=sys.stderr)
  print(result.statement)


def _define_flags() -> None:
  """The command's flags, defined only when it runs (importers keep their own flag names)."""
  flags.DEFINE_string("llm_url", None, "OpenAI-compatible base URL (e.g. .../v1) or full "
                      ".../chat/completions URL; default $LIVO_LLM_URL; unset: offline lexicon")
  flags.DEFINE_string("llm_model", None, f"default $LIVO_LLM_MODEL, else {DEFAULT_LLM_MODEL}")
  # The key itself is never a flag: command lines show up in the process list and in logs.
  flags.DEFINE_string("llm_api_key_env", None, "the environment variable that holds the API "
                      "key; default $LIVO_LLM_API_KEY, else $OPENAI_API_KEY")
  flags.DEFINE_float("timeout", chat.DEFAULT_TIMEOUT_S,
                     "seconds allowed for each whole LLM request attempt (connect, headers, body)")
  flags.DEFINE_integer("retries", chat.DEFAULT_RETRIES, "LLM request retries after a 5xx, 429, "
                       "timeout or connection error, with exponential backoff")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
