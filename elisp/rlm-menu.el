;;; rlm-menu.el --- A transient menu of rlm's settings  -*- lexical-binding: t; -*-

;; Copyright (C) 2026 The rlmd authors

;; Author: The rlmd authors
;; URL: https://github.com/rlmd/rlmd

;; This file is not part of GNU Emacs.

;; This program is free software; you can redistribute it and/or modify
;; it under the terms of the GNU General Public License as published by
;; the Free Software Foundation, either version 3 of the License, or
;; (at your option) any later version.

;; This program is distributed in the hope that it will be useful,
;; but WITHOUT ANY WARRANTY; without even the implied warranty of
;; MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
;; GNU General Public License for more details.

;; You should have received a copy of the GNU General Public License
;; along with this program.  If not, see <https://www.gnu.org/licenses/>.
;;; Commentary:

;; `rlm-menu' chooses everything a query takes, as gptel's menu does:
;; the root and sub models (completed from the daemon's pool), the
;; mode, the budgets, the cache, the context (this buffer, the region,
;; the subtree, files, the project, a context the daemon holds, or the
;; parts collected with `rlm-add', several at once) and where the
;; answer goes (a result buffer, or inserted at point).  "S" keeps the
;; settings buffer-local, "P" applies a preset of `rlm-define-preset'.

;;; Code:

(require 'cl-lib)
(require 'subr-x)
(require 'transient)
(require 'rlm)

(declare-function project-root "project" (project))

(defun rlm-menu--read-model (prompt initial history)
  "Read a model with PROMPT, INITIAL and HISTORY, completing from the pool."
  (completing-read prompt (ignore-errors (rlm-pool-models)) nil nil initial history))

(defun rlm-menu--initial-args ()
  "Return the menu's arguments from the settings in effect here."
  (let ((o (rlm-effective-options)))
    (delq nil
          (list (and (plist-get o :root_model) (concat "--root=" (plist-get o :root_model)))
                (and (plist-get o :sub_model) (concat "--sub=" (plist-get o :sub_model)))
                (and (plist-get o :mode) (concat "--mode=" (plist-get o :mode)))
                (and (plist-get o :max_iterations)
                     (format "--iterations=%s" (plist-get o :max_iterations)))
                (and (plist-get o :max_cost) (format "--cost=%s" (plist-get o :max_cost)))
                (and (plist-get o :timeout_s) (format "--time=%s" (plist-get o :timeout_s)))
                (and (eq (plist-get o :cache) :json-false) "--no-cache")))))

(defun rlm-menu-options (args)
  "Return the daemon options that the menu's ARGS choose."
  (let ((num (lambda (flag) (let ((v (transient-arg-value flag args)))
                              (and v (string-to-number v))))))
    (rlm--plist :root_model (transient-arg-value "--root=" args)
                :sub_model (transient-arg-value "--sub=" args)
                :mode (transient-arg-value "--mode=" args)
                :max_iterations (funcall num "--iterations=")
                :max_cost (funcall num "--cost=")
                :timeout_s (funcall num "--time=")
                :cache (and (member "--no-cache" args) :json-false))))

(defun rlm-menu--target (args)
  "Return the target (see `rlm-target') that the menu's ARGS choose."
  (pcase (or (transient-arg-value "--context=" args) "dwim")
    ("dwim" (rlm-target))
    ("buffer" (list :kind 'buffer))
    ("region" (if (use-region-p)
                  (list :kind 'region :start (region-beginning) :end (region-end))
                (user-error "No active region")))
    ("subtree" (pcase-let ((`(,start ,end ,heading ,part) (rlm-subtree-bounds)))
                 (list :kind 'subtree :start start :end end :heading heading :part part)))
    ("added" (if rlm--added-parts (list :kind 'added :parts rlm--added-parts)
               (user-error "No parts added: use `rlm-add' (key a) first")))
    ("files" (list :kind 'files :files (rlm--read-files)))
    ("project" (let ((p (project-current)))
                 (unless p (user-error "Not in a project"))
                 (list :kind 'files :files (list (project-root p)))))
    ("context" (list :kind 'context :name (rlm--read-context "Ask about context: ")))))

(defun rlm-menu-run (question args)
  "Ask QUESTION with the menu's ARGS; return the job."
  (let* ((target (rlm-menu--target args))
         (options (rlm-menu-options args))
         (insert (member "--insert" args))
         (rlm-query-options (rlm--merge-plists rlm-query-options options)))
    (pcase (plist-get target :kind)
      ('files (rlm-query-files question (plist-get target :files)))
      ('context (rlm-query-context question (plist-get target :name)))
      (_ (if insert
             (rlm-query-insert question nil target)
           (rlm--send-target question target))))))

(defun rlm-menu-ask (args)
  "Read a question and ask it with the menu's ARGS."
  (interactive (list (transient-args 'rlm-menu)))
  (let ((target (rlm-menu--target args)))
    (rlm-menu-run (rlm--read-question
                   (if (memq (plist-get target :kind) '(files context))
                       "Ask rlm: "
                     (rlm--target-prompt target)))
                  args)))

(defun rlm-menu-save (args)
  "Keep the menu's ARGS as this buffer's settings."
  (interactive (list (transient-args 'rlm-menu)))
  (let ((o (rlm-menu-options args)))
    (setq-local rlm-root-model (plist-get o :root_model))
    (setq-local rlm-sub-model (plist-get o :sub_model))
    (setq-local rlm-mode (plist-get o :mode))
    (setq-local rlm-max-iterations (plist-get o :max_iterations))
    (setq-local rlm-max-cost (plist-get o :max_cost))
    (setq-local rlm-timeout (plist-get o :timeout_s))
    (setq-local rlm-use-cache (not (plist-get o :cache)))
    (message "rlm: settings saved for %s" (buffer-name))))

(defun rlm-menu-preset (name)
  "Use the preset NAME in this buffer."
  (interactive (list (intern (completing-read "Preset: " (mapcar #'car rlm--presets) nil t))))
  (setq-local rlm-preset name)
  (message "rlm: preset %s in %s" name (buffer-name)))

;;;###autoload (autoload 'rlm-menu "rlm-menu" nil t)
(transient-define-prefix rlm-menu ()
  "Choose the models, budgets, context and destination of a query."
  :value #'rlm-menu--initial-args
  [["Models"
    ("-r" "root model" "--root=" :reader rlm-menu--read-model)
    ("-s" "sub-model" "--sub=" :reader rlm-menu--read-model)
    ("-m" "mode" "--mode=" :choices ("rlm" "rlm-nosub" "base"))]
   ["Budgets"
    ("-i" "iterations" "--iterations=" :reader transient-read-number-N+)
    ("-c" "cost ($)" "--cost=")
    ("-t" "time (s)" "--time=" :reader transient-read-number-N+)
    ("-n" "no cache" "--no-cache")]
   ["Context and answer"
    ("-x" "context" "--context="
     :choices ("dwim" "buffer" "region" "subtree" "files" "project" "context" "added"))
    ("-o" "insert the answer at point" "--insert")]]
  [["Parts"
    ("a" "add region/buffer" rlm-add :transient t)
    ("A" "clear added parts" rlm-add-clear :transient t)]
   ["Settings"
    ("S" "keep as this buffer's" rlm-menu-save)
    ("P" "use a preset here" rlm-menu-preset)]
   ["Ask"
    ("RET" "ask" rlm-menu-ask)]])

(provide 'rlm-menu)
;;; rlm-menu.el ends here
