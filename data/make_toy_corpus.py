"""Synthesise the offline toy corpus: generated English sentences spoken by flite and festival voices.

    apt-get install -y flite espeak-ng festival festvox-kdlpc16k
    python data/make_toy_corpus.py --out data/toy_corpus

Writes 16 kHz mono WAVs under OUT/wav/SPEAKER/ and one JSONL manifest per split, one utterance a line:
    {"id", "audio", "text", "speaker", "phonemes", "seconds"}
`audio` is relative to the manifest's folder. `phonemes` is espeak-ng's phonemisation of `text` (en-us,
ASCII phoneme names; see phonemise): tokens separated by spaces, words by " | ".

Splits (sentences are distinct across all of them):
    train        seen speakers (6)
    dev_seen     seen speakers, sentences in neither train nor test      choose settings on the dev splits
    dev_unseen   the 2 unseen speakers, sentences in neither train nor test
    dev_oog      seen speakers, sentences whose content words are all outside the training grammar (OOG)
    test_seen    seen speakers, sentences never in train or dev            report only
    test_unseen  the 2 unseen speakers, sentences never in train or dev
    codec_fit    espeak-ng voices, used only to fit the toy codec (never to train or test the codec LM): the
                 codebooks then cover more voices than the six training ones, which the unseen speakers need
test_unseen is written last. Re-running skips WAVs that already exist, so an interrupted build resumes;
a WAV's name holds a hash of its voice and text, so a changed grammar or voice never reuses a stale one.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from codec import atomic_write, write_text  # noqa: E402

SAMPLE_RATE = 16000

# name -> command that synthesises a text (see synthesise). Seen: three flite voices, each also at a
# shifted pitch; unseen: one flite and one festival voice. (espeak-ng's voices only help fit the codec:
# Whisper tiny.en misheard ~40% of their words, against 15-22% for these flite voices.)
VOICES = {
    "awb": ["flite", "-voice", "awb"],
    "awb_high": ["flite", "-voice", "awb", "--setf", "int_f0_target_mean=170"],  # 150 was too close to awb
    "rms": ["flite", "-voice", "rms"],
    "rms_low": ["flite", "-voice", "rms"],  # lowered by TAPE: flite's rms ignores int_f0_target_mean
    "slt": ["flite", "-voice", "slt"],
    "slt_high": ["flite", "-voice", "slt", "--setf", "int_f0_target_mean=220"],
    "kal16": ["flite", "-voice", "kal16"],
    "ked": ["text2wave", "-eval", "(voice_ked_diphone)"],  # festival, festvox-kdlpc16k
}
# Fitting-only voices: espeak-ng's en-us with 20 of its variants (formant synthesis, male and female). The
# codec fitted on these besides the training voices resynthesises the unseen voices better (data/README.md).
CODEC_FIT = tuple(f"esp_{v}" for v in "m1 m2 m3 m4 m5 m7 f1 f2 f3 f4 Andy Gene Michael Mike Paul Rob Steph Zac "
                  "grandpa klatt".split())
VOICES |= {name: ["espeak-ng", "-v", "en-us+" + name[4:]] for name in CODEC_FIT}
# Played back slower, like a tape: pitch and formants scale by this factor, duration by its inverse.
TAPE = {"rms_low": 0.88}
UNSEEN = ("kal16", "ked")

# --- the sentence grammar: word lists of our own --------------------------------------------------------
# Function words, shared with the out-of-grammar lists (OOG) below. Content words come by kind, so that
# subjects can act (people, animals, names), objects suit their verbs (things, food, drinks) and places
# follow prepositions of place: "the old farmer carried a heavy basket to the market".
FUNCTION = {
    "det": "the this that every each".split(),  # + a singular noun
    "det_some": "a one another".split(),  # + a singular noun, and after "there was"
    "det_pl": "the these those".split(),  # + a plural noun
    "det_many": """some many several two three four five six seven eight nine ten eleven twelve
        twenty""".split(),  # + a plural noun, and after "there were"
    "det_mass": "the some this that more enough".split(),  # + an uncountable noun
    "poss": "my your his her our their".split(),
    "subj": "i you he she we they".split(),
    "obj": "me you him her us them".split(),
    "modal": "will can could should must might would".split(),  # + a base form
    "prep_place": "in near behind beside outside inside at by".split(),
    "prep_thing": "under on beside behind near above below with".split(),
    "prep_motion": "to into toward across through past around along".split(),
    "conj": "and but while because so when before after until".split(),
}
TEMPLATE = "an there was were be last next".split()  # the other words the templates below write
PLURAL = {"child": "children", "man": "men", "woman": "women", "gentleman": "gentlemen", "fisherman":
          "fishermen", "mouse": "mice", "goose": "geese", "sheep": "sheep", "deer": "deer", "fish": "fish",
          "wife": "wives", "knife": "knives", "leaf": "leaves", "shelf": "shelves", "wolf": "wolves",
          "thief": "thieves", "calf": "calves", "scarf": "scarves", "potato": "potatoes", "tomato":
          "tomatoes", "hero": "heroes", "tooth": "teeth"}
A_OR_AN = {"uniform": "a", "useful": "a", "honest": "an"}  # where spelling misleads; checked in tests

W = {**FUNCTION,
    "name": """anna peter lucy martin oliver daniel emma thomas clara henry nora victor julia oscar helen
        simon grace james john mary sarah david michael robert linda susan paul mark kevin brian george
        jack lily rose kate amy tom ben sam max alice laura emily jane ruth frank eric adam lisa nancy
        betty tony ryan jason rachel hannah jacob ethan noah chloe charlie lucas leo william jessica
        joseph olivia sophie harry fred edward albert arthur walter richard matthew andrew patrick
        dorothy margaret joyce roy howard""".split(),
    "person": """man woman boy girl child baby mother father sister brother son daughter uncle aunt
        cousin grandmother grandfather friend neighbor husband wife parent teacher doctor nurse farmer
        baker cook chef driver pilot sailor soldier officer singer dancer painter artist writer student
        king queen prince princess captain fisherman gardener mechanic lawyer judge guard guest visitor
        stranger customer waiter hunter shepherd miner builder carpenter plumber tailor butcher clerk
        manager boss worker player coach scientist engineer dentist priest actor musician poet author
        reporter photographer librarian professor tourist traveler passenger pupil lady gentleman knight
        wizard witch giant clown pirate cowboy athlete runner swimmer explorer inventor detective mayor
        thief hero champion volunteer twin partner leader client pioneer""".split(),
    "animal": """cat dog bird horse cow pig sheep goat chicken duck goose mouse rabbit fox wolf bear deer
        lion tiger elephant monkey snake frog fish owl eagle squirrel turtle whale dolphin shark bee
        spider ant butterfly puppy kitten pony donkey bull calf lamb hen rooster swan crow robin hawk
        bat rat mule""".split(),
    "thing": """table chair bed lamp clock door window cup plate bowl spoon fork knife bottle box basket
        bag key book letter pencil pen map ticket coin ring watch hat coat shirt shoe sock glove scarf
        jacket dress umbrella blanket pillow towel mirror candle bucket hammer ladder rope brush comb
        kettle pot pan car bus truck bicycle boat ship train plane wagon tractor rocket ball doll kite
        drum guitar piano violin whistle bell toy tree flower rock stone leaf shell feather branch seed
        picture photo painting poster newspaper magazine card gift package parcel phone radio
        television camera computer machine engine wheel tool button needle belt boot bench desk shelf
        sofa carpet curtain fence gate wall roof statue sign flag tent sail anchor net cage nest
        barrel crown sword shield treasure jewel diamond pearl necklace medal trophy prize puzzle game
        globe compass lantern torch helmet apron uniform pocket wallet purse suitcase backpack
        envelope stamp calendar notebook diary novel photograph drawing model chain lock rug vase tray
        teapot mug glass napkin oven stove fridge sink bathtub shower faucet pipe hose shovel rake axe
        drill nail wire battery bulb switch tooth laptop mitten fire""".split(),
    "food": """apple orange lemon banana pear cherry grape peach potato tomato onion carrot cookie cake pie
        sandwich egg pumpkin melon cucumber pepper biscuit muffin pancake sausage burger pizza
        strawberry""".split(),
    "food_mass": """bread rice cheese butter sugar salt honey jam meat corn cream chocolate pasta flour
        fruit salad toast popcorn candy bacon ham beef food cereal""".split(),
    "liquid": "water milk tea coffee juice soup lemonade oil soda".split(),
    "material": "sand wood paint soap money paper wool cloth clay gold silver cotton iron".split(),
    "place": """kitchen garden river forest island mountain valley castle bridge harbor market station
        library school church hospital farm field beach lake hill village city town park street road
        shop store office bakery museum hotel restaurant theater tower cave desert jungle ocean garage
        barn yard house cottage palace prison zoo airport bank factory stadium playground classroom
        bedroom bathroom hallway basement cellar shore dock pond stream meadow orchard temple camp cabin
        hut shed stable mall gym studio court square corner country world coast bay cliff tunnel
        fountain chapel circus hilltop""".split(),
    "adj_any": """old new small big little large tall short long tiny huge heavy light quiet loud strange
        famous lovely beautiful pretty ugly clean dirty wet dry warm cold hot cool bright dark simple
        special wonderful terrible lucky perfect plain fine nice good bad great real average""".split(),
    "adj_thing": """red blue green yellow brown black white gray pink purple golden wooden round sharp flat
        smooth rough soft hard empty full broken shiny cheap expensive useful narrow wide thick thin deep
        sticky dusty rusty plastic leather woolen striped spotted colorful precious ordinary modern
        ancient electric frozen hollow loose tight bent tidy messy noisy beige""".split(),
    "adj_food": """sweet sour bitter salty spicy ripe fresh crisp juicy tasty delicious creamy raw
        frozen rotten""".split(),
    "adj_living": """young happy sad angry hungry thirsty tired sleepy brave clever kind gentle friendly
        polite rude shy proud lazy busy calm nervous curious lonely honest funny serious silly wise
        careful careless cheerful grumpy healthy sick strong weak rich poor patient jealous excited
        worried surprised smart loyal royal joyful generous pleasant cruel fierce wild tame furious""".split(),
    "adj_pred": "afraid asleep awake alone ready glad sorry late early upset alive".split(),  # after was
    "adj_place": """busy crowded empty sunny muddy narrow wide distant peaceful noisy ancient modern secret
        hidden frozen sandy rocky snowy windy local public private royal national""".split(),
    # verbs as base/past; v_living takes a living object, v_give a living one and then a thing
    "v_living": """help/helped call/called visit/visited follow/followed chase/chased thank/thanked
        meet/met teach/taught watch/watched hug/hugged greet/greeted invite/invited wake/woke warn/warned
        join/joined find/found see/saw hear/heard remember/remembered forget/forgot trust/trusted feed/fed
        save/saved catch/caught scare/scared protect/protected rescue/rescued miss/missed push/pushed
        carry/carried answer/answered comfort/comforted surprise/surprised paint/painted draw/drew
        pay/paid hire/hired guide/guided tickle/tickled hide/hid kiss/kissed admire/admired
        believe/believed encourage/encouraged recognize/recognized understand/understood know/knew
        like/liked love/loved obey/obeyed beat/beat ignore/ignored interview/interviewed tease/teased
        serve/served welcome/welcomed wash/washed brush/brushed measure/measured weigh/weighed
        examine/examined treat/treated annoy/annoyed avoid/avoided frighten/frightened cure/cured""".split(),
    "v_thing": """carry/carried find/found paint/painted open/opened wash/washed push/pushed pull/pulled
        lift/lifted drop/dropped clean/cleaned fix/fixed build/built buy/bought sell/sold bring/brought
        move/moved fill/filled count/counted touch/touched wrap/wrapped borrow/borrowed repair/repaired
        hide/hid keep/kept lose/lost share/shared throw/threw catch/caught hold/held take/took
        break/broke make/made choose/chose check/checked measure/measured polish/polished shake/shook
        draw/drew hang/hung pack/packed fold/folded steal/stole order/ordered return/returned
        deliver/delivered collect/collected notice/noticed want/wanted need/needed see/saw drag/dragged
        kick/kicked sharpen/sharpened bury/buried lock/locked empty/emptied weigh/weighed test/tested
        search/searched examine/examined design/designed sew/sewed carve/carved glue/glued
        print/printed mail/mailed cover/covered decorate/decorated replace/replaced guard/guarded
        rent/rented destroy/destroyed enjoy/enjoyed spoil/spoiled tighten/tightened""".split(),
    "v_food": """eat/ate cook/cooked taste/tasted bake/baked cut/cut slice/sliced fry/fried serve/served
        mix/mixed chop/chopped peel/peeled smell/smelled finish/finished share/shared buy/bought
        enjoy/enjoyed""".split(),
    "v_drink": "drink/drank pour/poured spill/spilled boil/boiled heat/heated taste/tasted sweeten/sweetened".split(),
    "v_intr": """laugh/laughed smile/smiled wait/waited sleep/slept dance/danced jump/jumped listen/listened
        walk/walked arrive/arrived shout/shouted whisper/whispered rest/rested travel/traveled
        wander/wandered hurry/hurried stay/stayed work/worked play/played sing/sang cry/cried run/ran
        swim/swam sit/sat stand/stood fall/fell climb/climbed wave/waved cough/coughed sneeze/sneezed
        yawn/yawned nod/nodded relax/relaxed study/studied cheer/cheered shiver/shivered sigh/sighed
        snore/snored giggle/giggled scream/screamed whistle/whistled clap/clapped kneel/knelt
        stretch/stretched pray/prayed cook/cooked hide/hid win/won lose/lost paint/painted draw/drew
        write/wrote think/thought agree/agreed breathe/breathed blink/blinked frown/frowned
        grin/grinned stop/stopped""".split(),
    "v_motion": """go/went come/came walk/walked run/ran drive/drove fly/flew ride/rode sail/sailed
        hurry/hurried move/moved return/returned travel/traveled swim/swam climb/climbed
        wander/wandered rush/rushed march/marched crawl/crawled race/raced jog/jogged hike/hiked""".split(),
    "v_give": """give/gave show/showed send/sent bring/brought hand/handed lend/lent offer/offered
        buy/bought sell/sold throw/threw pass/passed mail/mailed make/made""".split(),
    "adv": """quickly slowly quietly loudly happily gently carefully suddenly again together early late
        calmly proudly politely bravely softly safely easily rudely angrily sadly kindly patiently
        nervously warmly eagerly honestly badly""".split(),
    "adv_intr": "outside inside upstairs downstairs nearby away everywhere well hard fast".split(),
    "adv_pre": "never always often sometimes usually finally suddenly quickly slowly quietly carefully".split(),
    # time phrases: yesterday / last week / on monday / in the morning / in may
    "when_past": "yesterday today tonight earlier recently".split(),
    "when_future": "tomorrow today tonight soon later".split(),
    "period": "night week month year summer winter spring weekend".split(),
    "day_part": "morning afternoon evening".split(),
    "weekday": "monday tuesday wednesday thursday friday saturday sunday".split(),
    "month": """january february march april may june july august september october november
        december""".split(),
}

# Out-of-grammar (OOG) content words for the dev_oog split: common English words that W never uses, in
# the same kinds (FUNCTION's words are shared). Days, months and the other time words are a closed
# class that W uses up, so OOG sentences have no time phrase.
OOG = {**FUNCTION,
    "name": "felix stella wendy gloria nathan derek bruce diana vincent irene gordon".split(),
    "person": """surgeon butler sheriff janitor barber jockey tenant nephew niece bride groom toddler
        widow referee cashier""".split(),
    "animal": "zebra giraffe camel penguin kangaroo beaver raccoon octopus lobster parrot gorilla panda".split(),
    "thing": """bracelet sweater blender toaster ribbon magnet ladle funnel trumpet flute harp microphone
        telescope broom mop sponge thermometer canoe van cart""".split(),
    "food": "avocado pineapple coconut walnut peanut mango apricot plum radish pretzel waffle".split(),
    "food_mass": "yogurt oatmeal spinach broccoli lettuce mustard".split(),
    "liquid": "cider vinegar syrup broth".split(),
    "material": "cement rubber velvet silk marble copper steel".split(),
    "place": "gallery pharmacy cafeteria lobby balcony porch pier canal swamp prairie glacier ranch".split(),
    "adj_any": "enormous adorable elegant dreadful splendid marvelous mysterious".split(),
    "adj_thing": "fuzzy glossy slippery greasy shabby fragile sturdy".split(),
    "adj_food": "crunchy moldy stale soggy bland".split(),
    "adj_living": "grateful stubborn clumsy timid sincere humble anxious elderly gloomy weary".split(),
    "adj_pred": "ashamed unwell absent alert".split(),
    "adj_place": "deserted remote cozy spacious chilly humid damp".split(),
    "v_living": """scold/scolded applaud/applauded praise/praised tutor/tutored nudge/nudged pat/patted
        forgive/forgave blame/blamed amuse/amused consult/consulted escort/escorted""".split(),
    "v_thing": """stack/stacked sweep/swept scrub/scrubbed grab/grabbed toss/tossed crush/crushed
        squeeze/squeezed rinse/rinsed unpack/unpacked inspect/inspected purchase/purchased
        assemble/assembled discover/discovered misplace/misplaced donate/donated""".split(),
    "v_food": "devour/devoured nibble/nibbled munch/munched grill/grilled roast/roasted mash/mashed".split(),
    "v_drink": "sip/sipped gulp/gulped stir/stirred chill/chilled".split(),
    "v_intr": """chuckle/chuckled mumble/mumbled stumble/stumbled pause/paused hesitate/hesitated
        wink/winked shrug/shrugged weep/wept doze/dozed complain/complained celebrate/celebrated""".split(),
    "v_motion": """stroll/strolled sprint/sprinted wade/waded drift/drifted paddle/paddled
        tiptoe/tiptoed dash/dashed stagger/staggered limp/limped""".split(),
    "v_give": "award/awarded loan/loaned fetch/fetched toss/tossed promise/promised owe/owed".split(),
    "adv": "briskly cheerfully gracefully clumsily silently swiftly boldly firmly neatly".split(),
    "adv_intr": "indoors outdoors overseas abroad".split(),
    "adv_pre": "rarely seldom instantly eventually frequently nearly almost".split(),
}


def plural(noun):
    if noun in PLURAL:
        return PLURAL[noun]
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    return noun[:-1] + "ies" if noun.endswith("y") and noun[-2] not in "aeiou" else noun + "s"


def with_article(words):
    """`a` becomes `an` before a vowel sound (the spelling decides, but for the words in A_OR_AN)."""
    if words[0] == "a" and A_OR_AN.get(words[1], "an" if words[1][0] in "aeiou" else "a") == "an":
        return ["an"] + words[1:]
    return words


def verb(entry, past):
    base, past_form = entry.split("/")
    return past_form if past else base


ADJ = {"living": "adj_living", "thing": "adj_thing", "food": "adj_food", "place": "adj_place",
       "food_mass": "adj_food", "liquid": "adj_food", "material": "adj_thing"}
MASS = ("food_mass", "liquid", "material")  # uncountable: "some warm milk", never "a milk"


def noun_phrase(rng, g, kind, indefinite=False):
    """(words, plural) of a noun phrase of one kind: living, thing, food, place or one of MASS.
    At most two adjectives, a general one before a kind-specific one: "the old wooden chair".
    indefinite: for "there was/were ...": a, one, another, some, two, ...; no names, no possessives."""
    if kind == "living" and not indefinite and rng.random() < 0.15:
        return [rng.choice(g["name"])], False
    adjs = [rng.choice(g["adj_any"])] if rng.random() < 0.3 else []
    if rng.random() < 0.35:
        adjs.append(rng.choice(g[ADJ[kind]]))
    if kind in MASS:
        det = rng.choice(g["poss"] if rng.random() < 0.2 else g["det_mass"])
        return [det] + adjs + [rng.choice(g[kind])], False
    noun = rng.choice(g["person"] + g["animal"] if kind == "living" else g[kind])
    many = kind != "place" and rng.random() < 0.35  # places stay singular: "in the kitchen"
    if indefinite:
        dets = g["det_many" if many else "det_some"]
    elif rng.random() < 0.2:
        dets = g["poss"]
    else:
        dets = g["det_pl"] + g["det_many"] if many else g["det"] + g["det_some"]
    return with_article([rng.choice(dets)] + adjs + [plural(noun) if many else noun]), many


def living(rng, g, role):
    """A subject or object that can act: a pronoun (role "subj" or "obj"), a name, a person or an animal."""
    if rng.random() < 0.15:
        word = rng.choice(g[role])
        return [word], word in ("we", "they", "you")
    return noun_phrase(rng, g, "living")


def time_phrase(rng, g, future):
    r = rng.random()
    if r < 0.3:
        return [rng.choice(g["when_future" if future else "when_past"])]
    if r < 0.55:
        return ["next" if future else "last", rng.choice(g["period"])]
    if r < 0.75:
        return ["on", rng.choice(g["weekday"])]
    if r < 0.9:
        return ["in", "the", rng.choice(g["day_part"])]
    return ["in", rng.choice(g["month"])]


def clause(rng, g):
    """One clause: in the past tense, or a modal with a base form ("will carry", "might be")."""
    past = rng.random() < 0.7
    modal = [] if past else [rng.choice(g["modal"])]

    def be(many):
        return (["were"] if many else ["was"]) if past else modal + ["be"]

    def vp(verbs):
        pre = [rng.choice(g["adv_pre"])] if rng.random() < 0.1 else []
        return modal + pre + [verb(rng.choice(g[verbs]), past)]

    r = rng.random()
    if r < 0.08:  # there was an old clock in the kitchen
        what, many = noun_phrase(rng, g, rng.choice(["thing", "thing", "living", "food"]), indefinite=True)
        return ["there"] + be(many) + what + [rng.choice(g["prep_place"])] + noun_phrase(rng, g, "place")[0]
    if r < 0.18:  # the soup was hot / the children were tired and hungry
        kind = rng.choice(["living", "living", "living", "thing", "place", "liquid", "food_mass"])
        subject, many = living(rng, g, "subj") if kind == "living" else noun_phrase(rng, g, kind)
        lists = ["adj_any", ADJ[kind]] + (["adj_pred"] if kind == "living" else [])
        adjs = [rng.choice(g[rng.choice(lists)])]
        if rng.random() < 0.3:
            adjs += ["and", rng.choice(g[rng.choice(lists)])]
        return subject + be(many) + adjs
    words = living(rng, g, "subj")[0]
    if r < 0.3:  # she walked slowly to the old mill
        adv = [rng.choice(g["adv"])] if rng.random() < 0.2 else []
        return words + vp("v_motion") + adv + [rng.choice(g["prep_motion"])] + noun_phrase(rng, g, "place")[0]
    if r < 0.42:
        words += vp("v_intr")
        if rng.random() < 0.15:
            words += [rng.choice(g["adv_intr"])]
    elif r < 0.62:
        words += vp("v_living") + living(rng, g, "obj")[0]
    elif r < 0.82:
        words += vp("v_thing") + noun_phrase(rng, g, rng.choice(["thing"] * 8 + ["food", "material"]))[0]
    elif r < 0.89:
        words += vp("v_food") + noun_phrase(rng, g, rng.choice(["food", "food_mass"]))[0]
    elif r < 0.93:
        words += vp("v_drink") + noun_phrase(rng, g, "liquid")[0]
    else:  # she gave her brother a new book
        words += vp("v_give") + living(rng, g, "obj")[0] + noun_phrase(rng, g, "thing")[0]
    r = rng.random()
    if r < 0.25:
        words += [rng.choice(g["prep_place"])] + noun_phrase(rng, g, "place")[0]
    elif r < 0.4:
        words += [rng.choice(g["prep_thing"])] + noun_phrase(rng, g, "thing")[0]
    if rng.random() < 0.15:
        words += [rng.choice(g["adv"])]
    if "weekday" in g and rng.random() < 0.15:  # OOG has no time words
        words += time_phrase(rng, g, future=not past)
    return words


def sentence(rng, g=W, min_words=5, max_words=12):
    """One sentence of 5-12 words from the grammar g (W or OOG); drawn until it fits the length range."""
    while True:
        words = clause(rng, g)
        if len(words) < 7 and rng.random() < 0.5:
            words += [rng.choice(g["conj"])] + clause(rng, g)
        if min_words <= len(words) <= max_words:
            return " ".join(words)


def vocabulary(g=W):
    """Every word a sentence of g can hold: the lists' words, both forms of each verb, noun plurals."""
    words = {w for entries in g.values() for e in entries for w in e.split("/")} | set(TEMPLATE)
    return words | {plural(n) for k in ("person", "animal", "thing", "food") for n in g[k]}


def function_words():
    """The words W and OOG share (FUNCTION's and the templates'); every other OOG word is new to W."""
    return {w for entries in FUNCTION.values() for w in entries} | set(TEMPLATE)


STRESS = "',"  # espeak-ng's primary and secondary stress marks; it writes them before the stressed vowel


def phonemise(text):
    """espeak-ng's en-us phonemes of `text`, tokens separated by spaces, words by " | ".

    Stress marks become tokens of their own ("measure" -> "m ' E Z 3"), so that the vocabulary is the
    phoneme inventory plus two marks, not one symbol per stressed vowel. Phoneme names stay whole,
    whatever their letters: espeak-ng separates phonemes itself (--sep=_) and writes variants as
    their own phonemes (t# the flap t, @L syllabic l, n- syllabic n, I# and a# weak vowels, aI3, ...).
    A zero-width space between words keeps one group per word: without it espeak-ng writes some
    frequent pairs ("in the", "there was") as one word.
    """
    text = " \u200b ".join(text.split())
    out = subprocess.run(["espeak-ng", "-q", "-x", "--sep=_", "-v", "en-us", text],
                         check=True, capture_output=True, text=True).stdout
    return " | ".join(" ".join(t for p in w.split("_") if p for t in split_stress(p)) for w in out.split())


def split_stress(phoneme):
    """"'aI" -> ["'", "aI"]; ",eI" -> [",", "eI"]; "t#" -> ["t#"]."""
    name = phoneme.lstrip(STRESS)
    return list(phoneme[: len(phoneme) - len(name)]) + ([name] if name else [])


def wav_name(utt_id, speaker, text):
    """The WAV's name: its id and a hash of what made it, so a resumed build never keeps a stale WAV."""
    what = json.dumps([VOICES[speaker], TAPE.get(speaker, 1.0), text])
    return f"{utt_id}_{hashlib.sha1(what.encode()).hexdigest()[:10]}.wav"


def synthesise(job):
    """Write one utterance's 16 kHz WAV (skipped if it exists) and return its manifest row."""
    utt_id, speaker, text, wav_path, rel_path = job
    if not os.path.exists(wav_path):
        with tempfile.TemporaryDirectory() as tmp:
            out, cmd = os.path.join(tmp, "out.wav"), VOICES[speaker]
            if cmd[0] == "flite":
                cmd = cmd + ["-t", text, "-o", out]
            elif cmd[0] == "espeak-ng":  # 22.05 kHz, resampled below
                cmd = cmd + ["-w", out, text]
            else:  # festival's text2wave reads a file
                with open(os.path.join(tmp, "in.txt"), "w") as f:
                    f.write(text + "\n")
                cmd = cmd + [f.name, "-o", out]
            subprocess.run(cmd, check=True, capture_output=True)
            wav, sr = sf.read(out, dtype="float32")
        sr = sr * TAPE.get(speaker, 1.0)  # e.g. 16 kHz read as 14.08 kHz: slower and lower
        if sr != SAMPLE_RATE:
            import torch
            import torchaudio
            torch.set_num_threads(1)
            wav = torchaudio.functional.resample(torch.from_numpy(wav), round(sr), SAMPLE_RATE).numpy()
        wav = np.clip(wav, -1.0, 1.0)
        atomic_write(wav_path, lambda tmp: sf.write(tmp, wav, SAMPLE_RATE, format="WAV", subtype="PCM_16"))
    seconds = sf.info(wav_path).frames / SAMPLE_RATE
    return {"id": utt_id, "audio": rel_path, "text": text, "speaker": speaker,
            "phonemes": phonemise(text), "seconds": round(seconds, 3)}


def draw(rng, n, g, taken):
    """n sentences of grammar g that are not in `taken` (which they join), in the order drawn."""
    out = []
    while len(out) < n:
        s = sentence(rng, g)
        if s not in taken:
            taken.add(s)
            out.append(s)
    return out


def make_splits(args):
    """{split: [(speaker, text)]}, deterministic for args.seed. Test sentences are drawn first and dev
    sentences next, so neither depends on the training-set size, and no sentence is in two splits."""
    seen = [s for s in VOICES if s not in UNSEEN + CODEC_FIT]
    rng, taken = random.Random(args.seed), set()
    texts = {"test_seen": draw(rng, args.test_per_speaker * len(seen), W, taken),
             "test_unseen": draw(rng, args.unseen_per_speaker * len(UNSEEN), W, taken),
             "dev_seen": draw(rng, args.dev_per_speaker * len(seen), W, taken),
             "dev_unseen": draw(rng, args.dev_unseen_per_speaker * len(UNSEEN), W, taken),
             "dev_oog": draw(random.Random(f"oog{args.seed}"), args.dev_oog, OOG, taken)}
    texts["train"] = draw(rng, args.train_per_speaker * len(seen), W, taken)
    texts["codec_fit"] = draw(rng, args.codec_fit_per_voice * len(CODEC_FIT), W, taken)
    splits = {}
    for split in ["train", "codec_fit", "dev_seen", "dev_unseen", "dev_oog", "test_seen", "test_unseen"]:
        voices = UNSEEN if split.endswith("unseen") else CODEC_FIT if split == "codec_fit" else seen
        splits[split] = [(voices[i % len(voices)], text) for i, text in enumerate(texts[split])]
    return splits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/toy_corpus")
    ap.add_argument("--train_per_speaker", type=int, default=3000)
    ap.add_argument("--dev_per_speaker", type=int, default=40, help="dev_seen utterances per seen speaker")
    ap.add_argument("--dev_unseen_per_speaker", type=int, default=100)
    ap.add_argument("--dev_oog", type=int, default=120, help="dev_oog utterances in all")
    ap.add_argument("--test_per_speaker", type=int, default=60, help="test_seen utterances per seen speaker")
    ap.add_argument("--unseen_per_speaker", type=int, default=200, help="test_unseen utterances per unseen speaker")
    ap.add_argument("--codec_fit_per_voice", type=int, default=50,
                    help="codec_fit utterances per espeak-ng voice (fitting-only audio)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    from tqdm import tqdm

    for program, package in [("espeak-ng", "espeak-ng"), ("flite", "flite"), ("text2wave", "festival")]:
        if shutil.which(program) is None:
            raise SystemExit(f"{program} not found: apt-get install -y flite espeak-ng festival festvox-kdlpc16k "
                             f"({program} is in {package})")
    os.makedirs(args.out, exist_ok=True)
    with ProcessPoolExecutor(args.workers) as pool:
        for split, items in make_splits(args).items():
            jobs = []
            for i, (speaker, text) in enumerate(items):
                utt_id = f"{split}_{speaker}_{i:05d}"
                rel = os.path.join("wav", speaker, wav_name(utt_id, speaker, text))
                jobs.append((utt_id, speaker, text, os.path.join(args.out, rel), rel))
            rows = list(tqdm(pool.map(synthesise, jobs, chunksize=16), total=len(jobs), desc=split))
            write_text(os.path.join(args.out, split + ".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
            hours = sum(r["seconds"] for r in rows) / 3600
            print(f"{split}: {len(rows)} utterances, {hours:.2f} h, speakers {sorted({r['speaker'] for r in rows})}")


if __name__ == "__main__":
    main()
