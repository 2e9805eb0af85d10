"""The embedded default corpus: simple stories with real structure, generated deterministically.

Each story has a hero and a friend (names, kinds and pronouns that stay consistent), a place, an
object, a plot (lost and found, sharing, a storm, a race, baking, a new friend, ...), dialogue
and an ending. A small model trained on it for a few minutes learns to write the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

GIRLS = ["Lily", "Mia", "Sara", "Emma", "Anna", "Lucy", "Zoe", "Ella", "Rosa", "Nina", "Maya", "Amy", "Kim", "Ruby"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Omar", "Noah", "Jake", "Luke", "Eli", "Hugo"]
ANIMALS = [("dog", "Spot"), ("cat", "Kitty"), ("bunny", "Hops"), ("bird", "Tweety"), ("bear", "Bruno"),
           ("fox", "Rusty"), ("duck", "Daisy"), ("frog", "Fred"), ("mouse", "Pip"), ("owl", "Olly"),
           ("pig", "Penny"), ("lion", "Leo"), ("turtle", "Shelly"), ("puppy", "Buddy")]
ANIMAL_GENDER = {"Spot": "m", "Kitty": "f", "Hops": "m", "Tweety": "f", "Bruno": "m", "Rusty": "m", "Daisy": "f",
                 "Fred": "m", "Pip": "m", "Olly": "m", "Penny": "f", "Leo": "m", "Shelly": "f", "Buddy": "m"}
TRAITS = ["happy", "kind", "curious", "brave", "shy", "funny", "little", "small", "clever", "gentle"]
PLACES = [("park", "in the park"), ("forest", "in the forest"), ("beach", "at the beach"),
          ("garden", "in the garden"), ("farm", "on the farm"), ("river", "by the river"), ("hill", "on the hill"),
          ("school", "at school"), ("kitchen", "in the kitchen"), ("lake", "by the lake"),
          ("zoo", "at the zoo"), ("town", "in the town")]
OBJECTS = [("ball", "red"), ("kite", "blue"), ("hat", "yellow"), ("box", "big"), ("car", "toy"),
           ("book", "old"), ("shell", "shiny"), ("doll", "soft"), ("cup", "green"), ("drum", "loud"),
           ("boat", "little"), ("flower", "pretty"), ("key", "gold"), ("star", "bright")]
FOODS = ["cake", "cookies", "soup", "pie", "apples", "bread", "pancakes", "a sandwich"]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "warm inside"]
FEELINGS_BAD = ["sad", "scared", "worried", "upset", "lonely"]
WEATHER = ["sunny", "windy", "cold", "warm", "rainy", "bright"]
TIMES = ["One day", "One morning", "Once upon a time", "One sunny day", "Long ago", "One evening"]


@dataclass
class Character:
    name: str
    kind: str  # girl, boy, dog, ...
    gender: str  # f | m

    @property
    def he(self):
        return "she" if self.gender == "f" else "he"

    @property
    def him(self):
        return "her" if self.gender == "f" else "him"

    @property
    def his(self):
        return "her" if self.gender == "f" else "his"

    @property
    def He(self):
        return self.he.capitalize()

    @property
    def His(self):
        return self.his.capitalize()


def _character(rng: random.Random, avoid: str = "") -> Character:
    while True:
        roll = rng.random()
        if roll < 0.4:
            c = Character(rng.choice(GIRLS), "girl", "f")
        elif roll < 0.8:
            c = Character(rng.choice(BOYS), "boy", "m")
        else:
            kind, name = rng.choice(ANIMALS)
            c = Character(name, kind, ANIMAL_GENDER[name])
        if c.name != avoid:
            return c


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _opening(rng, hero, trait, place_phrase):
    t = rng.choice(TIMES)
    forms = [
        f"{t}, there was {_a(trait)} {hero.kind} named {hero.name}.",
        f"{t}, {_a(trait)} {hero.kind} named {hero.name} went to play {place_phrase}.",
        f"{t}, {hero.name} the {hero.kind} woke up and looked outside. It was {rng.choice(WEATHER)}.",
    ]
    s = rng.choice(forms)
    if "went to play" not in s:
        s += f" {hero.He} liked to play {place_phrase}."
    return s


def _lost_and_found(rng, hero, friend, place, obj):
    name, color = obj
    where = rng.choice(["under a tree", "behind a rock", "near the water", "in the tall grass", "under a bench"])
    return [
        f"{hero.He} had {_a(color)} {name}. {hero.He} loved {hero.his} {name} very much.",
        f"But then {hero.he} could not find {hero.his} {name}. {hero.name} felt {rng.choice(FEELINGS_BAD)}.",
        f'"Where is my {name}?" {hero.name} said. "I have looked everywhere!"',
        f"{friend.name} the {friend.kind} saw that {hero.name} was {rng.choice(FEELINGS_BAD)}.",
        f'"Do not worry, {hero.name}. I will help you," said {friend.name}.',
        f"They looked and looked. At last, {friend.name} found the {name} {where}.",
        f'"Here it is!" {friend.he} said. {hero.name} was so {rng.choice(FEELINGS_GOOD)}.',
        f'"Thank you, {friend.name}. You are a good friend," said {hero.name}, and {hero.he} gave {friend.him} a big hug.',
    ]


def _sharing(rng, hero, friend, place, obj):
    name, color = obj
    return [
        f"{hero.He} had {_a(color)} {name} and played with it all day.",
        f"{friend.name} the {friend.kind} came by. {friend.He} wanted to play with the {name} too.",
        f'"Can I play with your {name}?" asked {friend.name}.',
        f'At first {hero.name} said, "No, it is mine!" {friend.name} felt {rng.choice(FEELINGS_BAD)} and walked away.',
        f"{hero.name} looked at {friend.name} and thought about it. Playing alone was not much fun.",
        f'"Wait, {friend.name}! We can play with it together," {hero.he} said.',
        f"So they took turns with the {color} {name}. They laughed and played until the sun went down.",
        f"{hero.name} learned that sharing makes everyone {rng.choice(FEELINGS_GOOD)}.",
    ]


def _storm(rng, hero, friend, place, obj):
    return [
        f"{hero.He} was playing with {friend.name} the {friend.kind} when the sky got dark.",
        "Big clouds came, and the wind began to blow. Then the rain came down.",
        f'"I am scared," said {friend.name}. "What do we do?"',
        f'"Come with me," said {hero.name}. "We can hide {rng.choice(["under the big tree", "in the old barn", "in my house", "in a little cave"])}."',
        f"They ran fast and stayed dry while the storm went by. {hero.name} held {friend.his} hand.",
        "When the rain stopped, they saw a rainbow in the sky. It was so pretty.",
        f'"You were brave," {friend.name} said. {hero.name} smiled and felt {rng.choice(FEELINGS_GOOD)}.',
    ]


def _race(rng, hero, friend, place, obj):
    winner, other = (hero, friend) if rng.random() < 0.5 else (friend, hero)
    return [
        f'{friend.name} the {friend.kind} said, "Let us have a race to the {rng.choice(["big tree", "red gate", "old fence", "top of the hill"])}!"',
        f'"Yes!" said {hero.name}. "Ready, set, go!"',
        f"They ran as fast as they could. {other.name} fell down and hurt {other.his} knee.",
        f"{winner.name} stopped running and went back to help {other.him}.",
        f'"Are you okay?" asked {winner.name}. "I am okay now," said {other.name}.',
        f"They walked to the end together. Nobody won the race, but they were both {rng.choice(FEELINGS_GOOD)}.",
        "Helping a friend was better than winning.",
    ]


def _baking(rng, hero, friend, place, obj):
    food = rng.choice(FOODS)
    parent = rng.choice(["mom", "dad", "grandma", "grandpa"])
    return [
        f"{hero.He} wanted to make {food} with {hero.his} {parent}.",
        f'"Can we make {food} today?" {hero.name} asked. "Yes, we can," said {hero.his} {parent}.',
        f"They got a big bowl. {hero.name} put in the flour and the milk and mixed it all up.",
        f"Oops! {hero.name} spilled some flour on the floor. {hero.His} {parent} laughed.",
        f"Soon the {food} smelled very good. {friend.name} the {friend.kind} came to see.",
        f'"Would you like some?" asked {hero.name}. "Yes, please!" said {friend.name}.',
        f"They ate the {food} together. It was the best day, and {hero.name} was {rng.choice(FEELINGS_GOOD)}.",
    ]


def _new_friend(rng, hero, friend, place, obj):
    return [
        f"{hero.He} saw {_a(friend.kind)} sitting alone. It was {friend.name}, and {friend.he} looked {rng.choice(FEELINGS_BAD)}.",
        f'{hero.name} walked over and said, "Hello! My name is {hero.name}. What is your name?"',
        f'"I am {friend.name}," said the {friend.kind}. "I am new here, and I have no friends."',
        f'"You can be my friend," said {hero.name}. "Do you want to play with my {obj[0]}?"',
        f"{friend.name} smiled. They played all day and had so much fun.",
        f"From that day on, {hero.name} and {friend.name} were best friends.",
    ]


def _climb(rng, hero, friend, place, obj):
    thing = rng.choice(["a tall tree", "a big rock", "a high wall", "a steep hill"])
    return [
        f"{hero.He} saw {thing} and wanted to climb to the top.",
        f'"Be careful," said {friend.name} the {friend.kind}. "It is very high."',
        f'"I can do it," said {hero.name}. {hero.He} climbed up and up.',
        f"At the top, {hero.he} could see the whole {place}. But then {hero.he} was scared to come down.",
        f'"Help!" called {hero.name}. {friend.name} ran to get help, and soon {hero.name} was safe on the ground.',
        f'"Thank you," said {hero.name}. "Next time I will listen to you."',
    ]


def _gift(rng, hero, friend, place, obj):
    name, color = obj
    return [
        f"It was {friend.name}'s birthday, and {hero.name} wanted to give {friend.him} a gift.",
        f"{hero.He} had no money, so {hero.he} made {_a(color)} {name} all by {hero.him}self.",
        f"{hero.He} worked very hard. It was not perfect, but it was made with love.",
        f'"Happy birthday, {friend.name}!" said {hero.name}, and gave {friend.him} the {name}.',
        f'{friend.name} smiled a big smile. "I love it! It is the best gift," {friend.he} said.',
        f"{hero.name} felt {rng.choice(FEELINGS_GOOD)}. A gift from the heart is the best gift of all.",
    ]


PLOTS = [_lost_and_found, _sharing, _storm, _race, _baking, _new_friend, _climb, _gift]

ENDINGS = [
    "And they all lived happily ever after.",
    "The end.",
    "It was a very good day.",
    "{hero} went home and slept well that night.",
    "{hero} would never forget that day.",
]


def story(rng: random.Random) -> str:
    hero = _character(rng)
    friend = _character(rng, avoid=hero.name)
    place, place_phrase = rng.choice(PLACES)
    obj = rng.choice(OBJECTS)
    plot = rng.choice(PLOTS)
    first = _opening(rng, hero, rng.choice(TRAITS), place_phrase)
    body = plot(rng, hero, friend, place, obj)
    ending = rng.choice(ENDINGS).format(hero=hero.name)
    paragraphs = [" ".join([first] + body[:2]), " ".join(body[2:]), ending]
    return "\n\n".join(p for p in paragraphs if p)


def stories(n: int, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(n):
        yield story(rng)
